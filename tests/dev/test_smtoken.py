"""The development SM token itself (deploy/softhsm2-sm): SoftHSM2 built with the project's patch, called here through
PKCS#11 directly (tests are not kms; kms/hsm stays the only kms package that imports pkcs11).

This is a development token that checks kms's PKCS#11 calls, not vendor compatibility: these tests show that its SM4,
SM3 and SM2 agree with independent implementations and the standards' examples (cryptography's SM4, hashlib's SM3,
the OpenSSL command line's SM2, an SM2 written here from GB/T 32918, GB/T 32907 and GB/T 32905) under the codes of the
softhsm2-sm-dev profile (deploy/softhsm2-sm/README.md), not that any vendor's HSM behaves alike.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from helpers import requires_sm_token
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.attributes import AttributeMapper, handle_ulong
from pkcs11.constants import DEFAULT
from pkcs11.exceptions import KeySizeRange, KeyTypeInconsistent, WrappedKeyInvalid
from pkcs11.util.ec import encode_named_curve_parameters

from kms.dev import smtoken
from kms.hsm import softhsm

pytestmark = requires_sm_token


def _mechanism(code: int) -> Mechanism:
    return int.__new__(Mechanism, code)  # python-pkcs11 takes a vendor code only as a Mechanism


# The codes of the softhsm2-sm-dev profile (the token's src/lib/pkcs11/kms_sm.h).
CKK_SM4: KeyType = int.__new__(KeyType, 0x80004D34)
SM4_KEY_GEN = _mechanism(0x80004D01)
SM4_ECB = _mechanism(0x80004D02)
SM4_ECB_ENCRYPT_DATA = _mechanism(0x80004D03)
SM2_SM3 = _mechanism(0x80004D11)
SM2 = _mechanism(0x80004D12)
SM3 = _mechanism(0x80004D20)
#: DER of the SM2 curve's OID 1.2.156.10197.1.301 (CKA_EC_PARAMS of an SM2 key).
SM2_CURVE = bytes.fromhex("06082A811CCF5501822D")
#: The default user ID of GM/T 0009 that SM2_SM3 puts in Z_A.
SM2_ID = b"1234567812345678"

#: GB/T 32907-2016, example 1: key = plaintext, and the ciphertext.
GBT32907_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
GBT32907_CIPHERTEXT = bytes.fromhex("681EDF34D206965E86B3E94F536E4246")
#: GB/T 32905-2016, examples 1 and 2.
GBT32905 = {b"abc": "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0",
            b"abcd" * 16: "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"}
KEK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
LABEL, PIN, SO_PIN = "kms-sm-dev-test", "1234", "123456"


def sm4(key: bytes, data: bytes) -> bytes:
    """SM4-ECB in software (cryptography)."""
    encryptor = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def sm4_decrypt(key: bytes, data: bytes) -> bytes:
    decryptor = Cipher(algorithms.SM4(key), modes.ECB()).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def _key_type(raw: bytes) -> KeyType:
    value = handle_ulong[1](raw)
    try:
        return KeyType(value)
    except ValueError:
        return int.__new__(KeyType, value)  # CKK_SM4: python-pkcs11 reads key types before every operation


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A session on a fresh token of the development SM token, made with its softhsm2-util."""
    module, util = smtoken.sm_module(), smtoken.sm_util()
    assert module is not None and util is not None
    where = tmp_path_factory.mktemp("smtoken")
    conf = softhsm.write_conf(where)
    subprocess.run([util, "--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", SO_PIN],
                   env={**os.environ, "SOFTHSM2_CONF": str(conf)}, capture_output=True, check=True)
    # SoftHSM reads SOFTHSM2_CONF in C_Initialize and python-pkcs11 keeps one library per path: a copy of the module
    # of our own sees this token directory whatever else this test process has loaded.
    copy = where / "libsofthsm2.so"
    shutil.copyfile(module, copy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        lib = pkcs11.lib(str(copy))
    mapper = AttributeMapper()
    mapper.register_handler(Attribute.KEY_TYPE, lambda value: handle_ulong[0](int(value)), _key_type)
    with lib.get_token(token_label=LABEL).open(rw=True, user_pin=PIN, attribute_mapper=mapper) as opened:
        yield opened
    lib.finalize()


def sm4_key(session: Any, value: bytes, **usage: bool) -> Any:
    """A session SM4 key of this value (C_CreateObject); usage: ENCRYPT=True, ..."""
    template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: CKK_SM4, Attribute.VALUE: value,
                Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
    template.update({getattr(Attribute, name): flag for name, flag in usage.items()})
    return session.create_object(template)


class _KeyDerivationStringData(ctypes.Structure):
    """CK_KEY_DERIVATION_STRING_DATA: python-pkcs11 packs it only for the AES mechanisms."""

    _fields_ = (("pData", ctypes.c_void_p), ("ulLen", ctypes.c_ulong))


def derive(parent: Any, data: bytes, key_type: KeyType, **usage: bool) -> Any:
    """C_DeriveKey with SM4_ECB_ENCRYPT_DATA over data: an extractable session key of this type (16 bytes)."""
    buffer = ctypes.create_string_buffer(data, len(data))  # alive until the call returns
    param = bytes(_KeyDerivationStringData(ctypes.addressof(buffer), len(data)))
    template = {Attribute.TOKEN: False, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
                **{getattr(Attribute, name): flag for name, flag in usage.items()}}
    if key_type == KeyType.DES2:
        template[Attribute.VALUE_LEN] = DEFAULT  # the token sizes a DES key from its type and refuses CKA_VALUE_LEN
    return parent.derive_key(key_type, 128, mechanism=SM4_ECB_ENCRYPT_DATA, mechanism_param=param,
                             capabilities=MechanismFlag.ENCRYPT, template=template)


def test_the_token_lists_the_mechanisms_of_the_development_profile(session: Any) -> None:
    slot = session.token.slot
    listed = {int(m) for m in slot.get_mechanisms()}
    assert {SM4_KEY_GEN, SM4_ECB, SM4_ECB_ENCRYPT_DATA, SM2_SM3, SM2, SM3, Mechanism.EC_KEY_PAIR_GEN} <= listed
    sign_verify = MechanismFlag.SIGN | MechanismFlag.VERIFY
    wanted = {
        SM4_KEY_GEN: MechanismFlag.GENERATE, SM4_ECB_ENCRYPT_DATA: MechanismFlag.DERIVE, SM3: MechanismFlag.DIGEST,
        SM4_ECB: MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT | MechanismFlag.WRAP | MechanismFlag.UNWRAP,
        SM2_SM3: sign_verify, SM2: sign_verify,
    }
    for mechanism, flags in wanted.items():
        assert slot.get_mechanism_info(mechanism).flags & flags == flags, hex(mechanism)


def test_sm4_ecb_in_the_token_is_the_gbt32907_example_and_cryptographys_sm4(session: Any) -> None:
    key = sm4_key(session, GBT32907_KEY, ENCRYPT=True, DECRYPT=True)
    assert key.encrypt(GBT32907_KEY, mechanism=SM4_ECB) == GBT32907_CIPHERTEXT == sm4(GBT32907_KEY, GBT32907_KEY)
    assert key.decrypt(GBT32907_CIPHERTEXT, mechanism=SM4_ECB) == GBT32907_KEY
    two_blocks = bytes(range(32))
    assert key.encrypt(two_blocks, mechanism=SM4_ECB) == sm4(GBT32907_KEY, two_blocks)  # ECB, no padding
    assert key[Attribute.CHECK_VALUE] == sm4(GBT32907_KEY, bytes(16))[:3]
    assert key[Attribute.VALUE_LEN] == 16


def test_sm4_key_generation_makes_a_16_byte_key_with_its_check_value(session: Any) -> None:
    key = session.generate_key(CKK_SM4, 128, mechanism=SM4_KEY_GEN, capabilities=MechanismFlag.ENCRYPT,
                               template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
    value = key[Attribute.VALUE]
    assert len(value) == 16 and key[Attribute.VALUE_LEN] == 16
    assert key[Attribute.CHECK_VALUE] == sm4(value, bytes(16))[:3]
    assert key.encrypt(bytes(16), mechanism=SM4_ECB) == sm4(value, bytes(16))


def test_an_sm4_key_that_is_not_16_bytes_is_refused(session: Any) -> None:
    assert sm4_key(session, bytes(16), ENCRYPT=True)[Attribute.VALUE_LEN] == 16
    with pytest.raises(pkcs11.exceptions.AttributeValueInvalid):
        sm4_key(session, bytes(24), ENCRYPT=True)


def test_sm4_ecb_encrypt_data_derives_sm4_k_of_d_and_its_complement(session: Any) -> None:
    """DivSM4: child = SM4_parent(D || ~D), read out of the token wrapped under a known SM4 key and unwrapped in
    software."""
    parent = sm4_key(session, GBT32907_KEY, DERIVE=True)
    kek = sm4_key(session, KEK, WRAP=True)
    d = bytes.fromhex("8684320212345678")
    data = d + bytes(b ^ 0xFF for b in d)
    child = derive(parent, data, CKK_SM4, DERIVE=True)
    expected = sm4(GBT32907_KEY, data)
    assert sm4_decrypt(KEK, kek.wrap_key(child, mechanism=SM4_ECB)) == expected
    assert child[Attribute.CHECK_VALUE] == sm4(expected, bytes(16))[:3]
    grandchild = derive(child, data, CKK_SM4)  # a chain: the derived key derives in turn
    assert sm4_decrypt(KEK, kek.wrap_key(grandchild, mechanism=SM4_ECB)) == sm4(expected, data)


def test_sm4_ecb_encrypt_data_derives_a_double_length_des_key_with_odd_parity(session: Any) -> None:
    parent = sm4_key(session, GBT32907_KEY, DERIVE=True)
    kek = sm4_key(session, KEK, WRAP=True)
    data = bytes(range(16))
    child = derive(parent, data, KeyType.DES2)
    raw = sm4(GBT32907_KEY, data)
    with_parity = bytes(b & 0xFE | (bin(b >> 1).count("1") + 1) % 2 for b in raw)
    assert sm4_decrypt(KEK, kek.wrap_key(child, mechanism=SM4_ECB)) == with_parity != raw


def test_sm4_ecb_derivation_data_must_be_whole_blocks(session: Any) -> None:
    parent = sm4_key(session, GBT32907_KEY, DERIVE=True)
    with pytest.raises(pkcs11.exceptions.MechanismParamInvalid):
        derive(parent, bytes(8), CKK_SM4)


def test_c_unwrapkey_of_an_sm4_ecb_wrapped_key_gives_the_key(session: Any) -> None:
    kek = sm4_key(session, KEK, UNWRAP=True)
    card_key = bytes.fromhex("A0A1A2A3A4A5A6A7A8A9AAABACADAEAF")
    key = kek.unwrap_key(ObjectClass.SECRET_KEY, CKK_SM4, sm4(KEK, card_key), mechanism=SM4_ECB,
                         capabilities=MechanismFlag.ENCRYPT, template={Attribute.TOKEN: False})
    assert key.encrypt(bytes(16), mechanism=SM4_ECB)[:3] == sm4(card_key, bytes(16))[:3]  # the KCV, as kms checks it
    assert key[Attribute.VALUE_LEN] == 16
    aes = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, sm4(KEK, card_key * 2), mechanism=SM4_ECB,
                         capabilities=MechanismFlag.ENCRYPT, template={Attribute.TOKEN: False})
    assert aes.encrypt(bytes(16), mechanism=Mechanism.AES_ECB) == \
        Cipher(algorithms.AES(card_key * 2), modes.ECB()).encryptor().update(bytes(16))
    with pytest.raises(WrappedKeyInvalid):  # 32 bytes are no SM4 key
        kek.unwrap_key(ObjectClass.SECRET_KEY, CKK_SM4, sm4(KEK, card_key * 2), mechanism=SM4_ECB,
                       capabilities=MechanismFlag.ENCRYPT, template={Attribute.TOKEN: False})


def test_sm4_ecb_wraps_only_whole_blocks(session: Any) -> None:
    kek = sm4_key(session, KEK, WRAP=True)
    des3 = session.generate_key(KeyType.DES3, mechanism=Mechanism.DES3_KEY_GEN, capabilities=MechanismFlag.ENCRYPT,
                                template={Attribute.TOKEN: False, Attribute.EXTRACTABLE: True})
    with pytest.raises(KeySizeRange):  # 24 bytes
        kek.wrap_key(des3, mechanism=SM4_ECB)


def test_sm3_in_the_token_is_the_gbt32905_examples_and_hashlib(session: Any) -> None:
    for message, digest in GBT32905.items():
        assert session.digest(message, mechanism=SM3).hex() == digest == hashlib.new("sm3", message).hexdigest()
    assert session.digest([b"ab", b"c"], mechanism=SM3).hex() == GBT32905[b"abc"]  # C_DigestUpdate


# -- SM2 ----------------------------------------------------------------------------------------------------------

#: The SM2 curve's a, b, xG, yG (GB/T 32918.5), for Z_A.
_SM2_CURVE_ZA = bytes.fromhex(
    "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC"
    "28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93"
    "32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7"
    "BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0")


def sm2_keypair(session: Any, curve: bytes = SM2_CURVE) -> tuple[Any, Any]:
    params = session.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: curve}, local=True)
    public, private = params.generate_keypair(public_template={Attribute.VERIFY: True},
                                              private_template={Attribute.SIGN: True})
    return public, private


def spki_pem(point: bytes) -> bytes:
    """SubjectPublicKeyInfo (id-ecPublicKey, SM2 curve) of an uncompressed point, as PEM."""
    algorithm = bytes.fromhex("06072A8648CE3D0201") + SM2_CURVE
    bits = b"\x03" + bytes([len(point) + 1]) + b"\x00" + point
    body = b"\x30" + bytes([len(algorithm)]) + algorithm + bits
    der = b"\x30" + bytes([len(body)]) + body
    return b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der) + b"-----END PUBLIC KEY-----\n"


def ec_point(public: Any) -> bytes:
    octets = public[Attribute.EC_POINT]  # DER OCTET STRING of 04 || X || Y
    assert octets[:2] == b"\x04\x41"
    return bytes(octets[2:])


def z_a(point: bytes) -> bytes:
    """Z_A = SM3(ENTL || ID || a || b || xG || yG || xA || yA) with the default ID (GM/T 0009)."""
    return hashlib.new("sm3", (len(SM2_ID) * 8).to_bytes(2, "big") + SM2_ID + _SM2_CURVE_ZA + point[1:]).digest()


def openssl_verify(tmp_path: Path, point: bytes, message: bytes, signature: bytes) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pub.pem").write_bytes(spki_pem(point))
    (tmp_path / "msg").write_bytes(message)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    (tmp_path / "sig.der").write_bytes(encode_dss_signature(r, s))
    return subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"), "-rawin", "-digest", "sm3",
         "-pkeyopt", f"distid:{SM2_ID.decode()}", "-in", str(tmp_path / "msg"), "-sigfile", str(tmp_path / "sig.der")],
        capture_output=True, text=True, check=False)


def test_an_sm2_sm3_signature_made_in_the_token_verifies_with_openssl(session: Any, tmp_path: Path) -> None:
    public, private = sm2_keypair(session)
    message = b"kms section: SM2 with SM3 and the default ID"
    signature = private.sign(message, mechanism=SM2_SM3)
    assert len(signature) == 64
    assert "Signature Verified Successfully" in openssl_verify(tmp_path, ec_point(public), message, signature).stdout
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    assert "Signature Verified Successfully" not in openssl_verify(tmp_path, ec_point(public), message, tampered).stdout
    multi_part = private.sign([message[:10], message[10:]], mechanism=SM2_SM3)  # C_SignUpdate
    assert "Signature Verified Successfully" in openssl_verify(tmp_path, ec_point(public), message, multi_part).stdout


def test_an_sm2_sm3_signature_made_by_openssl_verifies_in_the_token(session: Any, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "SM2", "-out", str(key)], check=True, capture_output=True)
    spki = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                          capture_output=True).stdout
    point = spki[-65:]
    message = b"signed by OpenSSL"
    (tmp_path / "msg").write_bytes(message)
    subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", str(key), "-rawin", "-digest", "sm3", "-pkeyopt",
                    f"distid:{SM2_ID.decode()}", "-in", str(tmp_path / "msg"), "-out", str(tmp_path / "sig.der")],
                   check=True, capture_output=True)
    r, s = decode_dss_signature((tmp_path / "sig.der").read_bytes())
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    public = session.create_object({
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.EC, Attribute.TOKEN: False,
        Attribute.EC_PARAMS: SM2_CURVE, Attribute.EC_POINT: b"\x04\x41" + point, Attribute.VERIFY: True})
    assert public.verify(message, signature, mechanism=SM2_SM3)
    assert public.verify([message[:5], message[5:]], signature, mechanism=SM2_SM3)  # C_VerifyUpdate
    assert not public.verify(message + b".", signature, mechanism=SM2_SM3)  # CKR_SIGNATURE_INVALID
    assert not public.verify(message, signature[:63] + bytes([signature[63] ^ 1]), mechanism=SM2_SM3)


def test_sm2_signs_a_hash_computed_by_the_caller_as_sm2_sm3_does(session: Any, tmp_path: Path) -> None:
    """SM2 over e = SM3(Z_A || M), Z_A computed here in Python with the default ID: the token's SM2_SM3 and OpenSSL
    verify it, so both use the GM/T 0009 identity."""
    public, private = sm2_keypair(session)
    message = b"pre-hashed by the caller"
    e = hashlib.new("sm3", z_a(ec_point(public)) + message).digest()
    signature = private.sign(e, mechanism=SM2)
    assert public.verify(e, signature, mechanism=SM2)
    assert public.verify(message, signature, mechanism=SM2_SM3)
    assert "Signature Verified Successfully" in openssl_verify(tmp_path, ec_point(public), message, signature).stdout
    with pytest.raises(pkcs11.exceptions.PKCS11Error):
        private.sign(e[:31], mechanism=SM2)  # SM2 signs a 32-byte hash only


#: Known answers from OpenSSL's test data (test/recipes/30-test_evp_data/evppkey_sm2.txt, "Verify = SM2_key1" with
#: digest SM3): SM2_key1's public point, and (e, DER signature) pairs made elsewhere, fixed in the file.
OPENSSL_SM2_KEY1 = bytes.fromhex(
    "04393A2AD9E27E43ACAAAB85A19D3B85591E14406157175ADDD37BF77FF0CAF9ED"
    "37FCF3A8B4F55C038523261FCA6636AFE6A7AFA2A1482A606F5CB3A18B2E2A1E")
OPENSSL_SM2_VERIFY = (
    ("D7AD397F6FFA5D4F7F11E7217F241607DC30618C236D2C09C1B9EA8FDADEE2E8",
     "3046022100AB1DB64DE7C40EDBDE6651C9B8EBDB804673DB836E5D5C7FE15DCF9ED2725037022100EBA714451FF69B0BB930B379E192E7CD"
     "5FA6E3C41C7FBD8303B799AB54A54621"),
    ("B1139602C6ECC9E15E2F3F9C635A1AFE737058BC15387479C1EA0D0B3D90E9E5",
     "3045022100E6E0414EBD3A656C35602AF14AB20287DBF30D57AF75C49A188ED4B42391F22402202F54F277C606F4605E1CE9514947FFDD"
     "F94C67A539804A4ED17F852288BDBE2E"),
)


def test_sm2_verifies_the_known_answers_of_openssls_test_data(session: Any) -> None:
    public = session.create_object({
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.EC, Attribute.TOKEN: False,
        Attribute.EC_PARAMS: SM2_CURVE, Attribute.EC_POINT: b"\x04\x41" + OPENSSL_SM2_KEY1, Attribute.VERIFY: True})
    for e, der in OPENSSL_SM2_VERIFY:
        r, s = decode_dss_signature(bytes.fromhex(der))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        assert public.verify(bytes.fromhex(e), signature, mechanism=SM2)
        assert not public.verify(bytes.fromhex(e)[::-1], signature, mechanism=SM2)


def test_sm2_mechanisms_refuse_keys_of_another_curve(session: Any) -> None:
    public, private = sm2_keypair(session, encode_named_curve_parameters("secp256r1"))
    with pytest.raises(KeyTypeInconsistent):
        private.sign(b"message", mechanism=SM2_SM3)
    with pytest.raises(KeyTypeInconsistent):
        private.sign(bytes(32), mechanism=SM2)
    with pytest.raises(KeyTypeInconsistent):
        public.verify(b"message", bytes(64), mechanism=SM2_SM3)


#: The order n of the SM2 curve (GB/T 32918.5).
SM2_N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123


def test_many_sm2_sm3_signatures_verify_in_the_token_and_a_sample_with_openssl(session: Any, tmp_path: Path) -> None:
    """200 random messages signed in the token (the token computes SM2 itself: k.G and d.G with its fixed-base comb,
    the rest with BIGNUM/EC_POINT arithmetic, and a per-process cache of private keys' public points): each verifies
    in the token and a tampered copy does not; every signature is 64 bytes; 20 of them, and one whose r or s needs a
    leading zero byte, verify with OpenSSL."""
    public, private = sm2_keypair(session)
    point = ec_point(public)
    rng = random.Random(14)
    messages = [rng.randbytes(rng.randrange(0, 300)) for _ in range(200)]
    signatures = [private.sign(message, mechanism=SM2_SM3) for message in messages]
    for message, signature in zip(messages, signatures, strict=True):
        assert len(signature) == 64
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        assert 0 < r < SM2_N and 0 < s < SM2_N
        assert public.verify(message, signature, mechanism=SM2_SM3)
        assert not public.verify(message + b"x", signature, mechanism=SM2_SM3)
        flip = rng.randrange(64)
        tampered = signature[:flip] + bytes([signature[flip] ^ (1 << rng.randrange(8))]) + signature[flip + 1:]
        assert not public.verify(message, tampered, mechanism=SM2_SM3)
    for message, signature in list(zip(messages, signatures, strict=True))[:20]:
        assert "Signature Verified Successfully" in openssl_verify(tmp_path, point, message, signature).stdout
    # A signature whose r or s is below 2^248 (a leading zero byte, about 1 in 128): still 64 bytes, and still valid.
    for attempt in range(4000):
        message = b"leading zero %d" % attempt
        signature = private.sign(message, mechanism=SM2_SM3)
        assert len(signature) == 64
        if signature[0] == 0 or signature[32] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero byte in r or s in 4000")
    assert public.verify(message, signature, mechanism=SM2_SM3)
    assert "Signature Verified Successfully" in openssl_verify(tmp_path, point, message, signature).stdout


def test_sm2_signatures_of_two_keys_use_each_keys_own_public_point(session: Any, tmp_path: Path) -> None:
    """Interleaved signatures with two keys: Z_A is each key's own (the token derives and caches the public point of
    a private key), so each verifies under its own public key, with OpenSSL too, and not under the other."""
    keys = [sm2_keypair(session), sm2_keypair(session)]
    message = b"which key signed this"
    for _ in range(3):
        for index, (public, private) in enumerate(keys):
            signature = private.sign(message, mechanism=SM2_SM3)
            other = keys[1 - index][0]
            assert public.verify(message, signature, mechanism=SM2_SM3)
            assert not other.verify(message, signature, mechanism=SM2_SM3)
            e = hashlib.new("sm3", z_a(ec_point(public)) + message).digest()
            assert public.verify(message, private.sign(e, mechanism=SM2), mechanism=SM2_SM3)
    for public, private in keys:
        verified = openssl_verify(tmp_path, ec_point(public), message, private.sign(message, mechanism=SM2_SM3))
        assert "Signature Verified Successfully" in verified.stdout


def test_sm2_verify_refuses_r_and_s_out_of_range(session: Any) -> None:
    """r and s must be in [1, n-1] and r + s must not be n (GB/T 32918.2 verification, steps B1, B2 and B5)."""
    public, private = sm2_keypair(session)
    e = bytes(range(32))
    signature = private.sign(e, mechanism=SM2)
    assert public.verify(e, signature, mechanism=SM2)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    for bad_r, bad_s in ((0, s), (r, 0), (r + SM2_N, s), (r, s + SM2_N), (r, SM2_N - r), (SM2_N, s)):
        if bad_r < 2**256 and bad_s < 2**256:
            bad = bad_r.to_bytes(32, "big") + bad_s.to_bytes(32, "big")
            assert not public.verify(e, bad, mechanism=SM2)
    assert not public.verify(e, signature[:63], mechanism=SM2)


#: The generator of the SM2 curve, 04 || xG || yG (GB/T 32918.5).
SM2_G = bytes.fromhex(
    "0432C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7"
    "BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0")


def sm2_private(session: Any, d: int) -> Any:
    """A session SM2 private key of this scalar (C_CreateObject, CKA_VALUE = d)."""
    return session.create_object({
        Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC, Attribute.TOKEN: False,
        Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EC_PARAMS: SM2_CURVE,
        Attribute.VALUE: d.to_bytes(32, "big"), Attribute.SIGN: True})


def sm2_public(session: Any, encoded_point: bytes) -> Any:
    """A session SM2 public key whose CKA_EC_POINT is the DER OCTET STRING of these bytes (not checked here)."""
    return session.create_object({
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.EC, Attribute.TOKEN: False,
        Attribute.EC_PARAMS: SM2_CURVE, Attribute.EC_POINT: bytes([0x04, len(encoded_point)]) + encoded_point,
        Attribute.VERIFY: True})


def test_sm2_verify_refuses_an_off_curve_or_infinite_public_point(session: Any) -> None:
    """A public key whose point is not on the curve (OpenSSL's EC_POINT_oct2point refuses it) or is the point at
    infinity (encoded 00, which EC_POINT_oct2point accepts) never verifies, not even a signature made for the key
    on the curve whose point differs from it in one bit of y."""
    private = sm2_private(session, 1)
    e = bytes(range(32))
    signature = private.sign(e, mechanism=SM2)
    assert sm2_public(session, SM2_G).verify(e, signature, mechanism=SM2)  # d = 1: P = G
    off_curve = SM2_G[:64] + bytes([SM2_G[64] ^ 1])
    assert not sm2_public(session, off_curve).verify(e, signature, mechanism=SM2)
    assert not sm2_public(session, off_curve).verify(b"message", signature, mechanism=SM2_SM3)
    infinity = sm2_public(session, b"\x00")
    assert not infinity.verify(e, signature, mechanism=SM2)
    assert not infinity.verify(e, bytes(64), mechanism=SM2)
    assert not infinity.verify(b"message", signature, mechanism=SM2_SM3)


def test_sm2_signing_with_a_private_scalar_out_of_range_fails_cleanly(session: Any, tmp_path: Path) -> None:
    """d must be in [1, n-2] (1 + d must be invertible mod n): d = 0, n - 1, n and 2^256 - 1 give an error, not a
    signature, and not a crash; d = n - 2 (the largest valid) signs, and the signature verifies with OpenSSL under
    P = (n - 2).G = -2G, i.e. the public point the token derived and cached for Z_A is right."""
    for d in (0, SM2_N - 1, SM2_N, 2**256 - 1):
        private = sm2_private(session, d)
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            private.sign(bytes(32), mechanism=SM2)
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            private.sign(b"message", mechanism=SM2_SM3)
    key = tmp_path / "key.pem"
    der = bytes.fromhex("30310201010420") + (SM2_N - 2).to_bytes(32, "big") + bytes.fromhex("a00a") + SM2_CURVE
    (tmp_path / "key.der").write_bytes(der)
    subprocess.run(["openssl", "ec", "-inform", "DER", "-in", str(tmp_path / "key.der"), "-out", str(key)],
                   check=True, capture_output=True)
    spki = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                          capture_output=True).stdout
    message = b"the largest private scalar"
    signature = sm2_private(session, SM2_N - 2).sign(message, mechanism=SM2_SM3)
    assert "Signature Verified Successfully" in openssl_verify(tmp_path, spki[-65:], message, signature).stdout



# -- SM2 k.G and d.G in the token (its fixed-base comb) against an independent SM2 --------------------------------
# The token computes k.G (signing) and d.G (a private key's public point, for Z_A) with its own constant-time
# fixed-base comb (kms_sm2_mulg.h in the patch) and verifies with OpenSSL's EC_POINT_mul. The SM2 below is written
# here from GB/T 32918.1/.2 (Jacobian coordinates, a = -3, k.P as a sum of the j.16^i.P: not constant-time), shares
# nothing with either, and checks the token's signatures and derived public points.
# tests/dev/test_sm2_mulg.py checks the comb itself against OpenSSL in C, edge scalars included.

#: The SM2 curve (GB/T 32918.5): p, a = p - 3, b, and G.
SM2_P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
SM2_B = int.from_bytes(_SM2_CURVE_ZA[32:64], "big")
_G = (int.from_bytes(SM2_G[1:33], "big"), int.from_bytes(SM2_G[33:], "big"), 1)
_INFINITY = (1, 1, 0)
Jacobian = tuple[int, int, int]


def _double(point: Jacobian) -> Jacobian:
    x, y, z = point
    if z == 0 or y == 0:
        return _INFINITY
    p = SM2_P
    yy = y * y % p
    s = 4 * x * yy % p
    zz = z * z % p
    m = 3 * (x - zz) * (x + zz) % p  # 3x^2 + a.z^4 with a = -3
    x3 = (m * m - 2 * s) % p
    return x3, (m * (s - x3) - 8 * yy * yy) % p, 2 * y * z % p


def _add(one: Jacobian, two: Jacobian) -> Jacobian:
    if one[2] == 0:
        return two
    if two[2] == 0:
        return one
    p = SM2_P
    (x1, y1, z1), (x2, y2, z2) = one, two
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    if u1 == u2:
        return _double(one) if s1 == s2 else _INFINITY
    h, r = (u2 - u1) % p, (s2 - s1) % p
    hh = h * h % p
    hhh, v = h * hh % p, u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - s1 * hhh) % p, z1 * z2 * h % p


def _table(point: Jacobian) -> list[list[Jacobian]]:
    """j.16^i.point for i < 64 and j < 16, so that k.point is one addition per non-zero hexadecimal digit of k
    (kept for G and the last point)."""
    if point not in _TABLES:
        if len(_TABLES) > 1:
            _TABLES.pop(next(key for key in _TABLES if key != _G))
        table, base = [], point
        for _ in range(64):
            row = [_INFINITY, base]
            for _ in range(14):
                row.append(_add(row[-1], base))
            table.append(row)
            base = _add(row[-1], base)  # 16.base
        _TABLES[point] = table
    return _TABLES[point]


_TABLES: dict[Jacobian, list[list[Jacobian]]] = {}


def _multiply(k: int, point: Jacobian) -> Jacobian:
    result = _INFINITY
    for row in _table(point):
        result = _add(result, row[k & 15])
        k >>= 4
    return result


def _affine(point: Jacobian) -> tuple[int, int] | None:
    if point[2] == 0:
        return None
    inverse = pow(point[2], -1, SM2_P)
    return point[0] * inverse * inverse % SM2_P, point[1] * pow(inverse, 3, SM2_P) % SM2_P


def py_sm2_point(d: int) -> bytes:
    """d.G as 04 || x || y (GB/T 32918.1, 6.1: a public key is d.G)."""
    affine = _affine(_multiply(d, _G))
    assert affine is not None
    return b"\x04" + affine[0].to_bytes(32, "big") + affine[1].to_bytes(32, "big")


def py_sm2_verify(point: bytes, e: bytes, signature: bytes) -> bool:
    """GB/T 32918.2, 7.1, steps B1-B7, for a given e (B3-B4 are SM3(Z_A || M), computed by the caller)."""
    x, y = int.from_bytes(point[1:33], "big"), int.from_bytes(point[33:], "big")
    assert point[0] == 4 and (y * y - x**3 + 3 * x - SM2_B) % SM2_P == 0  # on the curve
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if len(signature) != 64 or not (0 < r < SM2_N and 0 < s < SM2_N):
        return False
    t = (r + s) % SM2_N
    if t == 0:
        return False
    affine = _affine(_add(_multiply(s, _G), _multiply(t, (x, y, 1))))
    return affine is not None and (int.from_bytes(e, "big") + affine[0]) % SM2_N == r


def py_sm2_sm3_verify(point: bytes, message: bytes, signature: bytes) -> bool:
    return py_sm2_verify(point, hashlib.new("sm3", z_a(point) + message).digest(), signature)


def test_the_independent_sm2_knows_the_public_key_and_signature_of_openssls_test_data() -> None:
    """The Python SM2 above reproduces GB/T 32918's arithmetic: it accepts OpenSSL's known answers (and not a
    changed e), and 2G, -G, (n - 1).G and n.G come out as the group law says."""
    for e, der in OPENSSL_SM2_VERIFY:
        r, s = decode_dss_signature(bytes.fromhex(der))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        assert py_sm2_verify(OPENSSL_SM2_KEY1, bytes.fromhex(e), signature)
        assert not py_sm2_verify(OPENSSL_SM2_KEY1, bytes.fromhex(e)[::-1], signature)
    assert py_sm2_point(1) == SM2_G
    minus_g = SM2_G[:33] + (SM2_P - int.from_bytes(SM2_G[33:], "big")).to_bytes(32, "big")
    assert py_sm2_point(SM2_N - 1) == minus_g
    assert _multiply(SM2_N, _G)[2] == 0
    assert _affine(_add(_G, _G)) == _affine(_multiply(2, (_G[0], _G[1], 1))) == _affine(_double(_G))


def test_2000_sm2_sm3_signatures_made_in_the_token_verify_with_an_independent_sm2(session: Any) -> None:
    """2,000 random messages signed with CKM_SM2_SM3 in the token, each with a fresh random k: every signature
    verifies with the Python SM2 under the key's CKA_EC_POINT (so k.G's x-coordinate was right each time, and so
    was the public point the token derived from d for Z_A), and a tampered one does not. 200 CKM_SM2 signatures of
    random 32-byte e likewise."""
    public, private = sm2_keypair(session)
    point = ec_point(public)
    rng = random.Random(21)
    for _ in range(2000):
        message = rng.randbytes(rng.randrange(0, 200))
        signature = private.sign(message, mechanism=SM2_SM3)
        assert py_sm2_sm3_verify(point, message, signature), (message.hex(), signature.hex())
    tampered = signature[:40] + bytes([signature[40] ^ 0x10]) + signature[41:]
    assert not py_sm2_sm3_verify(point, message, tampered)
    assert not py_sm2_sm3_verify(point, message + b"x", signature)
    for _ in range(200):
        e = rng.randbytes(32)
        signature = private.sign(e, mechanism=SM2)
        assert py_sm2_verify(point, e, signature), (e.hex(), signature.hex())


#: Private scalars at the edges of the comb's 7-bit signed windows, the top window alone, and the top of [1, n-2].
EDGE_PRIVATE_SCALARS = (1, 2, 3, 63, 64, 65, 127, 128, 129, 2**7 * 64, 2**14 - 1, 2**245, 2**252, 15 * 2**252,
                        2**252 - 1, 2**255, 2**256 - 2**252 - 1, SM2_N - 3, SM2_N - 2,
                        sum(2 ** (7 * j + 6) for j in range(36)) % SM2_N)


def test_the_token_derives_the_public_point_of_edge_private_scalars_as_gbt32918_does(session: Any) -> None:
    """Private keys made from chosen scalars (C_CreateObject): the token derives d.G itself for Z_A, so a
    CKM_SM2_SM3 signature verifies with the Python SM2 under the d.G computed here only if the token's d.G is the
    same point. Random scalars too; and a public key object of that point verifies the signature in the token."""
    rng = random.Random(2114)
    scalars = list(EDGE_PRIVATE_SCALARS) + [rng.randrange(1, SM2_N - 1) for _ in range(20)]
    message = b"whose public point is this"
    for d in scalars:
        point = py_sm2_point(d)
        signature = sm2_private(session, d).sign(message, mechanism=SM2_SM3)
        assert py_sm2_sm3_verify(point, message, signature), hex(d)
        assert sm2_public(session, point).verify(message, signature, mechanism=SM2_SM3), hex(d)


_SIGN_WITH_ENV = """
import os, subprocess, sys
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
module, util, where, d = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
os.makedirs(where + "/tokens")
with open(where + "/softhsm2.conf", "w") as conf:
    conf.write(f"directories.tokendir = {where}/tokens\\nobjectstore.backend = file\\nlog.level = ERROR\\n")
os.environ["SOFTHSM2_CONF"] = where + "/softhsm2.conf"
subprocess.run([util, "--init-token", "--free", "--label", "t", "--pin", "1234", "--so-pin", "123456"], check=True,
               capture_output=True)
lib = pkcs11.lib(module)
with lib.get_token(token_label="t").open(rw=True, user_pin="1234") as session:
    private = session.create_object({
        Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC, Attribute.TOKEN: False,
        Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EC_PARAMS: bytes.fromhex("06082A811CCF5501822D"),
        Attribute.VALUE: d.to_bytes(32, "big"), Attribute.SIGN: True})
    for i in range(20):
        print(private.sign(b"message %d" % i, mechanism=int.__new__(Mechanism, 0x80004D11)).hex())
lib.finalize()
"""


@pytest.mark.parametrize("mulg", ["openssl", "comb"])
def test_the_token_signs_alike_with_openssls_ladder_in_place_of_the_comb(mulg: str, tmp_path: Path) -> None:
    """KMS_SM_TOKEN_SM2_MULG=openssl makes the token compute k.G and d.G with OpenSSL's ladder, the path it also
    takes if the comb fails its check against OpenSSL when the group is set up: its signatures verify with the
    Python SM2 as the comb's do (in a process of their own: the choice is made once per process)."""
    module, util = smtoken.sm_module(), smtoken.sm_util()
    assert module is not None and util is not None
    d = 0x1F2E3D4C5B6A79880123456789ABCDEFFEDCBA98765432100F1E2D3C4B5A6978
    env = {key: value for key, value in os.environ.items() if key != "KMS_SM_TOKEN_SM2_MULG"}
    if mulg == "openssl":
        env["KMS_SM_TOKEN_SM2_MULG"] = "openssl"
    run = subprocess.run([sys.executable, "-c", _SIGN_WITH_ENV, module, util, str(tmp_path / "token"), str(d)],
                         env=env, capture_output=True, text=True, check=True)
    signatures = [bytes.fromhex(line) for line in run.stdout.split()]
    assert len(signatures) == 20
    point = py_sm2_point(d)
    for i, signature in enumerate(signatures):
        assert py_sm2_sm3_verify(point, b"message %d" % i, signature)
