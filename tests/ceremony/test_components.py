"""kms.ceremony.components: check values of components and keys by their algorithm's method (pure)."""

from __future__ import annotations

import pytest

from kms.cards import reference
from kms.ceremony import components
from kms.errors import InvalidArgument
from kms.hsm.types import Algorithm, KcvMethod

# GB/T 32907 example 1: SM4_K(P) with K = P = 0123456789ABCDEFFEDCBA9876543210 gives 681EDF34D206965E86B3E94F536E4246
SM4_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def test_an_sm4_component_has_the_sm4_kcv_of_its_method() -> None:
    assert components.kcv_method(Algorithm.SM4) is KcvMethod.SM4_ECB_ZERO
    assert components.kcv(Algorithm.SM4, SM4_KEY) == reference.kcv_sm4(SM4_KEY).hex().upper()
    assert reference.sm4_ecb(SM4_KEY, SM4_KEY).hex().upper() == "681EDF34D206965E86B3E94F536E4246"
    # the same 16 bytes as a DES2 key have another check value, by another method
    assert components.kcv(Algorithm.DES2, SM4_KEY) == reference.kcv_tdes(SM4_KEY).hex().upper()
    assert components.kcv(Algorithm.DES2, SM4_KEY) != components.kcv(Algorithm.SM4, SM4_KEY)


def test_an_sm4_component_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="SM4 component is 16 bytes"):
        components.kcv(Algorithm.SM4, bytes(15))
