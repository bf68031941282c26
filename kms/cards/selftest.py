"""HSM known-answer self-test: runs derivation vectors (tests/vectors/derivation.json, and the SM4 kinds of
tests/vectors/sm4.json) through the real HSM path — the same ``derive_wrap`` the engine uses — and compares each
result with the vector.

Each vector's master key is imported as a session object (gone when the session closes), with a session KEK whose
value is known to this test only, so the wrapped result can be unwrapped in software and compared: an AES-256 KEK
(AES key wrap) for 3DES cases, an SM4 KEK (SM4-ECB wrap) for SM4 cases. Every KCV the HSM gives is also checked
against the key it belongs to (TDES-ECB-ZERO8-3, SM4-ECB-ZERO16-3).

SM4 cases run in the HSM when its mechanism profile and token offer SM4_ECB_ENCRYPT_DATA and SM4_ECB; an SM4 block
(GB/T 32907) is computed in the token as an SM4_ECB_ENCRYPT_DATA derivation whose data is the plaintext (the derived
key is SM4_K(plaintext)). On a token without SM4 they are reported "not supported by this HSM", checked in software,
and do not fail the run; so are SM4 blocks encrypted more than once (GB/T 32907 example 2: a million iterations is a
million token calls), checked in software on any token.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from kms.cards import recipes, reference
from kms.cards.cardid import CardIdentity
from kms.errors import ConfigError, HsmError, MechanismUnavailable
from kms.hsm.labels import selftest_label
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm, DeriveStep
from kms.validation import unknown_keys

KINDS = ("option_a", "gp_kmc", "ssc_chain", "sm4_block", "tdes_kcv", "div_sm4", "div_sm4_chain", "pboc_sm4_udk")
#: What the token must offer for SM4 cases to run in it.
SM4_MECHANISMS = (DeriveStep.SM4_ECB.value, "SM4_ECB")


@dataclass(frozen=True)
class CaseResult:
    case: str
    source: str
    status: str  # pass | fail | unsupported
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def load_vectors(path: Path) -> dict[str, list[dict[str, Any]]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected an object of vector lists")
    unknown = unknown_keys(doc, {*KINDS, "about"})
    if unknown:
        raise ConfigError(f"{path}: unknown vector kind {unknown[0]!r}; known: {', '.join(KINDS)}")
    return {k: v for k, v in doc.items() if k in KINDS}


class SelfTest:
    def __init__(self, session: TokenSession) -> None:
        self._session = session
        self._kek = bytearray(secrets.token_bytes(32))
        self._kek_label = selftest_label("kek")
        self._session.import_transport_key(self._kek_label, bytearray(self._kek), token=False)
        self._sm4_kek: bytearray | None = None  # made at the first SM4 case, on a token with SM4
        self._sm4_kek_label = selftest_label("kek-sm4")

    def close(self) -> None:
        self._session.destroy(self._kek_label)
        for kek in (self._kek, self._sm4_kek):
            if kek is not None:
                for i in range(len(kek)):
                    kek[i] = 0
        if self._sm4_kek is not None:
            self._session.destroy(self._sm4_kek_label)

    def run(self, vectors: dict[str, list[dict[str, Any]]]) -> Iterator[CaseResult]:
        runners: dict[str, Callable[[dict[str, Any]], str]] = {
            "option_a": self._option_a, "gp_kmc": self._gp_kmc, "ssc_chain": self._ssc_chain,
            "sm4_block": self._sm4_block, "tdes_kcv": self._tdes_kcv, "div_sm4": self._div_sm4,
            "div_sm4_chain": self._div_sm4_chain, "pboc_sm4_udk": self._pboc_sm4_udk,
        }
        for kind in KINDS:
            for i, case in enumerate(vectors.get(kind, [])):
                name = f"{kind}[{i}]"
                source = str(case.get("source", ""))
                try:
                    detail = runners[kind](case)
                    yield CaseResult(name, source, "pass", detail)
                except _Unsupported as unsupported:
                    yield CaseResult(name, source, "unsupported", str(unsupported))
                except _Mismatch as mismatch:
                    yield CaseResult(name, source, "fail", str(mismatch))
                except (KeyError, ValueError, TypeError) as error:
                    yield CaseResult(name, source, "fail", f"malformed vector: {type(error).__name__} {error}")
                except HsmError as error:
                    yield CaseResult(name, source, "fail", str(error))

    # -- kinds --------------------------------------------------------------------------------------------------

    def _derive(self, master: str, steps: recipes.Steps, algorithm: Algorithm = Algorithm.DES2
                ) -> tuple[bytes, bytes]:
        """The card key ``steps`` derive from ``master`` (a DES2 or SM4 key) in the token, wrapped under the
        self-test's transport key of the same family (AES key wrap; SM4-ECB under an SM4 key) and unwrapped here,
        with the HSM's KCV."""
        sm4 = algorithm is Algorithm.SM4
        kek, kek_label = (self._sm4_transport(), self._sm4_kek_label) if sm4 else (self._kek, self._kek_label)
        label = selftest_label("master")
        self._session.import_master_key(label, algorithm, bytearray.fromhex(master), token=False)
        try:
            result = self._session.derive_wrap(label, steps, kek_label)
        finally:
            self._session.destroy(label)
        if not sm4:
            return aes_key_unwrap_with_padding(bytes(kek), result.wrapped), result.kcv
        if result.wrap != "SM4-ECB":
            raise _Mismatch(f"the card key was wrapped by {result.wrap}, not SM4-ECB, under an SM4 transport key")
        return _sm4_ecb_decrypt(bytes(kek), result.wrapped), result.kcv

    def _check(self, what: str, key: bytes, kcv: bytes, want_key: str, want_kcv: str | None,
               algorithm: Algorithm = Algorithm.DES2) -> str:
        if key.hex().upper() != want_key.upper():
            raise _Mismatch(f"{what}: derived key differs from the vector")
        if want_kcv is not None and kcv.hex().upper() != want_kcv.upper():
            raise _Mismatch(f"{what}: KCV {kcv.hex().upper()} differs from the vector's {want_kcv.upper()}")
        if algorithm is Algorithm.SM4:
            if kcv != reference.kcv_sm4(key):
                raise _Mismatch(f"{what}: the HSM's KCV does not match its own key")
            return f"{what} in the HSM, KCV {kcv.hex().upper()}"
        if kcv != reference.kcv_tdes(key):
            raise _Mismatch(f"{what}: the HSM's KCV does not match its own key")
        return f"{what} KCV {kcv.hex().upper()}"

    def _option_a(self, case: dict[str, Any]) -> str:
        card = CardIdentity(card_ref="selftest", pan=case["pan"], psn=case["psn"])
        key, kcv = self._derive(case["imk"], recipes.OptionA().steps(card))
        return self._check("UDK", key, kcv, case["key"], case.get("kcv"))

    def _gp_kmc(self, case: dict[str, Any]) -> str:
        card = CardIdentity(card_ref="selftest", kdd=case["kdd"].upper())
        details = []
        for which in ("enc", "mac", "dek"):
            recipe = recipes.GpKmc(method=case["method"], key=which)
            key, kcv = self._derive(case["kmc"], recipe.steps(card))
            details.append(self._check(which.upper(), key, kcv, case[which], case.get(f"kcv_{which}")))
        return ", ".join(details)

    def _ssc_chain(self, case: dict[str, Any]) -> str:
        factors = [bytes.fromhex(f) for f in case["factors"]]
        if not 1 <= len(factors) <= 3:
            raise ValueError("a chain has 1 to 3 factors")
        if case["algorithm"] == "sm4":
            return self._sm4_chain(case["root"], factors, case["key"], case.get("kcv"))
        if case["algorithm"] != "3des":
            raise ValueError(f"unknown chain algorithm {case['algorithm']!r}")
        steps = tuple((DeriveStep.DES3_ECB, f + reference.complement(f)) for f in factors)
        key, kcv = self._derive(case["root"], steps)
        return self._check(f"{len(factors)}-level Div3DES", key, kcv, case["key"], case.get("kcv"))

    # -- SM4 kinds ------------------------------------------------------------------------------------------------

    def _sm4_block(self, case: dict[str, Any]) -> str:
        key, plaintext = bytes.fromhex(case["key"]), bytes.fromhex(case["plaintext"])
        iterations = int(case.get("iterations", 1))
        if iterations != 1:
            if _sm4_iterated(key, plaintext, iterations).hex().upper() != case["ciphertext"].upper():
                raise _Mismatch(f"{iterations} iterations: the software reference disagrees with the vector")
            raise _Unsupported(f"{iterations} iterations are not run through the HSM (one token call each); "
                               "software reference matches")
        self._sm4_available(reference.sm4_ecb(key, plaintext), case["ciphertext"])
        # SM4_K(P) in the token: an SM4_ECB_ENCRYPT_DATA derivation over P gives the key SM4_K(P).
        derived, kcv = self._derive(case["key"], ((DeriveStep.SM4_ECB, plaintext),), Algorithm.SM4)
        if derived.hex().upper() != case["ciphertext"].upper():
            raise _Mismatch("SM4-ECB in the HSM differs from the vector's ciphertext")
        # The ciphertext is a key the token derived: named by its KCV only, like every other key (tests/test_canary.py)
        return f"SM4-ECB in the HSM matches the vector's ciphertext (as a key: KCV {kcv.hex().upper()})"

    def _div_sm4(self, case: dict[str, Any]) -> str:
        return self._sm4_chain(case["key"], [bytes.fromhex(case["factor"])], case["derived"], case.get("kcv"))

    def _div_sm4_chain(self, case: dict[str, Any]) -> str:
        factors = [bytes.fromhex(f) for f in case["factors"]]
        if not 1 <= len(factors) <= 3:
            raise ValueError("a chain has 1 to 3 factors")
        return self._sm4_chain(case["root"], factors, case["key"], case.get("kcv"))

    def _pboc_sm4_udk(self, case: dict[str, Any]) -> str:
        # The PBOC SM4 UDK: Option A's Y, then SM4_IMK(Y ‖ ~Y) in one SM4_ECB_ENCRYPT_DATA step.
        y = reference.option_a_input(case["pan"], case["psn"])
        if "y" in case and y.hex().upper() != case["y"].upper():
            raise _Mismatch(f"Y {y.hex().upper()} differs from the vector's {case['y'].upper()}")
        self._sm4_available(reference.sm4_ecb(bytes.fromhex(case["imk"]), y + reference.complement(y)),
                            case["key"])
        key, kcv = self._derive(case["imk"], ((DeriveStep.SM4_ECB, y + reference.complement(y)),), Algorithm.SM4)
        return self._check("SM4 UDK", key, kcv, case["key"], case.get("kcv"), Algorithm.SM4)

    def _sm4_chain(self, root: str, factors: list[bytes], want_key: str, want_kcv: str | None) -> str:
        self._sm4_available(reference.chain("sm4", bytes.fromhex(root), factors), want_key)
        steps = tuple((DeriveStep.SM4_ECB, f + reference.complement(f)) for f in factors)
        key, kcv = self._derive(root, steps, Algorithm.SM4)
        return self._check(f"{len(factors)}-level DivSM4", key, kcv, want_key, want_kcv, Algorithm.SM4)

    def _sm4_available(self, computed: bytes, expected: str) -> None:
        """SM4 needs vendor mechanisms; on a token without them, say so and check the arithmetic in software."""
        try:
            for mechanism in SM4_MECHANISMS:
                self._session.require(mechanism)
        except MechanismUnavailable as missing:
            if computed.hex().upper() != expected.upper():
                raise _Mismatch("not supported by this HSM, and the software reference disagrees") from None
            raise _Unsupported(f"not supported by this HSM ({missing.mechanism}); software reference matches"
                               ) from None

    def _sm4_transport(self) -> bytearray:
        if self._sm4_kek is None:
            kek = bytearray(secrets.token_bytes(16))
            kcv = self._session.import_transport_key(self._sm4_kek_label, bytearray(kek), token=False,
                                                     algorithm=Algorithm.SM4)
            self._sm4_kek = kek
            if kcv != reference.kcv_sm4(bytes(kek)):
                raise _Mismatch("the HSM's KCV of an imported SM4 key is not SM4-ECB-ZERO16-3 of the key")
        return self._sm4_kek

    def _tdes_kcv(self, case: dict[str, Any]) -> str:
        label = selftest_label("kcv")
        kcv = self._session.import_master_key(label, Algorithm.DES2, bytearray.fromhex(case["key"]), token=False)
        self._session.destroy(label)
        if kcv.hex().upper() != case["kcv"].upper():
            raise _Mismatch(f"KCV {kcv.hex().upper()} differs from the vector's {case['kcv'].upper()}")
        return f"KCV {kcv.hex().upper()}"


def _sm4_ecb_decrypt(key: bytes, data: bytes) -> bytes:
    decryptor = Cipher(algorithms.SM4(key), modes.ECB()).decryptor()  # noqa: S305 - SM4-ECB is the wrap
    return decryptor.update(data) + decryptor.finalize()


def _sm4_iterated(key: bytes, block: bytes, iterations: int) -> bytes:
    """SM4_K applied ``iterations`` times (GB/T 32907 example 2), with one encryptor."""
    encryptor = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()  # noqa: S305 - the standard's example
    for _ in range(iterations):
        block = encryptor.update(block)
    return block


class _Mismatch(Exception):
    pass


class _Unsupported(Exception):
    pass
