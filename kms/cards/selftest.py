"""HSM known-answer self-test: runs derivation vectors (schema of tests/vectors/derivation.json) through the real
HSM path — the same ``derive_wrap`` the engine uses — and compares each result with the vector.

Each vector's master key is imported as a session object (gone when the session closes), with a session KEK whose
value is known to this test only, so the wrapped result can be unwrapped in software and compared. SM4 cases on a
token without SM4 are reported "not supported by this HSM", checked in software, and do not fail the run.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from kms.cards import recipes, reference
from kms.cards.cardid import CardIdentity
from kms.errors import ConfigError, HsmError, MechanismUnavailable
from kms.hsm.labels import selftest_label
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm, DeriveStep
from kms.validation import unknown_keys

KINDS = ("option_a", "gp_kmc", "ssc_chain", "sm4_block", "tdes_kcv")


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

    def close(self) -> None:
        self._session.destroy(self._kek_label)
        for i in range(len(self._kek)):
            self._kek[i] = 0

    def run(self, vectors: dict[str, list[dict[str, Any]]]) -> Iterator[CaseResult]:
        runners: dict[str, Callable[[dict[str, Any]], str]] = {
            "option_a": self._option_a, "gp_kmc": self._gp_kmc, "ssc_chain": self._ssc_chain,
            "sm4_block": self._sm4_block, "tdes_kcv": self._tdes_kcv,
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

    def _derive(self, master: str, steps: recipes.Steps) -> tuple[bytes, bytes]:
        label = selftest_label("master")
        self._session.import_master_key(label, Algorithm.DES2, bytearray.fromhex(master), token=False)
        try:
            result = self._session.derive_wrap(label, steps, self._kek_label)
        finally:
            self._session.destroy(label)
        return aes_key_unwrap_with_padding(bytes(self._kek), result.wrapped), result.kcv

    def _check(self, what: str, key: bytes, kcv: bytes, want_key: str, want_kcv: str | None) -> str:
        if key.hex().upper() != want_key.upper():
            raise _Mismatch(f"{what}: derived key differs from the vector")
        if want_kcv is not None and kcv.hex().upper() != want_kcv.upper():
            raise _Mismatch(f"{what}: KCV {kcv.hex().upper()} differs from the vector's {want_kcv.upper()}")
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
        steps = tuple((DeriveStep.DES3_ECB, f + reference.complement(f)) for f in factors)
        if case["algorithm"] == "sm4":
            self._software_sm4(
                reference.chain("sm4", bytes.fromhex(case["root"]), factors), case["key"], DeriveStep.SM4_ECB.value
            )
        if case["algorithm"] != "3des":
            raise ValueError(f"unknown chain algorithm {case['algorithm']!r}")
        key, kcv = self._derive(case["root"], steps)
        return self._check(f"{len(factors)}-level Div3DES", key, kcv, case["key"], case.get("kcv"))

    def _sm4_block(self, case: dict[str, Any]) -> str:
        self._software_sm4(
            reference.sm4_ecb(bytes.fromhex(case["key"]), bytes.fromhex(case["plaintext"])),
            case["ciphertext"], "SM4_ECB",
        )
        raise AssertionError("unreachable")  # pragma: no cover

    def _software_sm4(self, computed: bytes, expected: str, mechanism: str) -> None:
        """SM4 needs a vendor mechanism; on a token without it, say so and check the arithmetic in software."""
        try:
            self._session.require(mechanism)
        except MechanismUnavailable:
            if computed.hex().upper() != expected.upper():
                raise _Mismatch("not supported by this HSM, and the software reference disagrees") from None
            raise _Unsupported("not supported by this HSM; software reference matches") from None
        raise _Unsupported(f"{mechanism} is offered, but kms has no binding for this vendor's SM4 yet")

    def _tdes_kcv(self, case: dict[str, Any]) -> str:
        label = selftest_label("kcv")
        kcv = self._session.import_master_key(label, Algorithm.DES2, bytearray.fromhex(case["key"]), token=False)
        self._session.destroy(label)
        if kcv.hex().upper() != case["kcv"].upper():
            raise _Mismatch(f"KCV {kcv.hex().upper()} differs from the vector's {case['kcv'].upper()}")
        return f"KCV {kcv.hex().upper()}"


class _Mismatch(Exception):
    pass


class _Unsupported(Exception):
    pass
