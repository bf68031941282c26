"""CPU time per SM2 signature and verification in the development SM token (and ECDSA P-256 for scale).

    .venv/bin/python deploy/softhsm2-sm/bench-sm2.py <prefix>/lib/softhsm/libsofthsm2.so <prefix>/bin/softhsm2-util [N]

A fresh token in a temporary directory; N (1,000) C_Sign, then N C_Verify of those signatures, on a stored key pair:
a 300-byte message for CKM_SM2_SM3, a 32-byte e for CKM_SM2. Measures time.process_time() of this process (the
module runs in it). See README.md, "SM2 in the token: how, and how fast".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism

SM2_SM3 = int.__new__(Mechanism, 0x80004D11)  # python-pkcs11 takes a vendor code only as a Mechanism
SM2 = int.__new__(Mechanism, 0x80004D12)
SM2_CURVE = bytes.fromhex("06082A811CCF5501822D")
P256 = bytes.fromhex("06082A8648CE3D030107")


def per_op(session: Any, curve: bytes, mechanism: Mechanism, data: bytes, n: int) -> tuple[float, float, bool]:
    params = session.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: curve}, local=True)
    public, private = params.generate_keypair(store=True, public_template={Attribute.VERIFY: True},
                                              private_template={Attribute.SIGN: True})
    private.sign(data, mechanism=mechanism)
    start = time.process_time()
    signatures = [private.sign(data, mechanism=mechanism) for _ in range(n)]
    sign = (time.process_time() - start) / n * 1e3
    start = time.process_time()
    valid = all(public.verify(data, signature, mechanism=mechanism) for signature in signatures)
    verify = (time.process_time() - start) / n * 1e3
    return sign, verify, valid


def main() -> None:
    module, util = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    where = Path(tempfile.mkdtemp())
    try:
        (where / "tokens").mkdir()
        conf = where / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {where}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        subprocess.run([util, "--init-token", "--free", "--label", "bench", "--pin", "1234", "--so-pin", "123456"],
                       check=True, capture_output=True)
        copy = where / "libsofthsm2.so"  # python-pkcs11 keeps one library per path
        shutil.copyfile(module, copy)
        lib = pkcs11.lib(str(copy))
        with lib.get_token(token_label="bench").open(rw=True, user_pin="1234") as session:
            cases = (("SM2_SM3", SM2_CURVE, SM2_SM3, os.urandom(300)), ("SM2", SM2_CURVE, SM2, os.urandom(32)),
                     ("ECDSA-P256", P256, Mechanism.ECDSA, os.urandom(32)))
            for name, curve, mechanism, data in cases:
                sign, verify, valid = per_op(session, curve, mechanism, data, n)
                print(f"{name:10} sign {sign:.3f} ms  verify {verify:.3f} ms  (N={n}, all valid: {valid})")
        lib.finalize()
    finally:
        shutil.rmtree(where)


if __name__ == "__main__":
    main()
