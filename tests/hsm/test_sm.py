"""The HSM port's SM verbs (SM4 keys, derivation and wrapping, the station side, SM2, SM3) against the development
SM token, and their refusal on a token without SM.

The development token is SoftHSM2 built with kms's own patch (deploy/softhsm2-sm/): it checks kms's PKCS#11 calls
under the codes of the ``softhsm2-sm-dev`` mechanism profile; it says nothing about a vendor's HSM. Its results are
checked against independent implementations: ``cryptography``'s SM4, hashlib's SM3 (OpenSSL), the OpenSSL command
line's SM2 (``openssl pkeyutl``), published vectors. Tests that need it skip, saying so, when it is not built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from helpers import requires_sm_token

from kms import config, runtime
from kms.cards import reference
from kms.dev import smtoken
from kms.errors import HsmError, InvalidArgument, MechanismUnavailable
from kms.hsm import mechanisms, softhsm, spki
from kms.hsm.session import TokenSession, store_station_keys
from kms.hsm.types import Algorithm, DeriveStep, SignatureAlgorithm

DEV = "softhsm2-sm-dev"
ISSUER, STATION = "kms-sm-issuer", "kms-sm-station"
SM_NAMES = {"SM4_KEY_GEN", "SM4_ECB", "SM4_ECB_ENCRYPT_DATA", "SM2_SM3", "SM2", "SM3"}
DEFAULT_ID = "1234567812345678"  # GM/T 0009's default signer identity


SM_MODULE = smtoken.sm_module()  # the development SM token (tests/helpers.py requires_sm_token skips without it)
requires_sm = requires_sm_token


def _label(kind: str) -> str:
    return f"kms/test/{kind}/{secrets.token_hex(6)}"


def _sm4_decrypt(key: bytes, data: bytes) -> bytes:
    decryptor = Cipher(algorithms.SM4(key), modes.ECB()).decryptor()
    return decryptor.update(data) + decryptor.finalize()


@pytest.fixture(scope="module")
def sm_tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TokenSession]]:
    """Two fresh tokens on the development module (an issuer's, a station's), read with the development profile."""
    assert SM_MODULE is not None
    directory = tmp_path_factory.mktemp("sm-tokens")
    conf = softhsm.write_conf(directory)
    pins = {}
    for token in (ISSUER, STATION):
        softhsm.ensure_token(conf, token, directory / f"{token}.pin", directory / f"{token}.so-pin")
        pins[token] = (directory / f"{token}.pin").read_text().strip()
    previous = os.environ.get("SOFTHSM2_CONF")
    # A copy of the module under a path of its own: a library is initialized once per path and process, reading
    # SOFTHSM2_CONF then, so other tests of this process loading the development module keep their own tokens.
    own = directory / "libsofthsm2-sm.so"
    shutil.copyfile(SM_MODULE, own)
    hsm = config.HsmConfig(module=str(own), softhsm2_conf=conf, mechanisms=DEV)
    try:
        module = runtime.module(hsm)
    finally:  # the module read its configuration when it loaded; other tests' processes keep theirs
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
    assert module.mechanisms.name == DEV
    opened = {token: module.open(token, pins[token]) for token in (ISSUER, STATION)}
    yield opened
    for session in opened.values():
        session.close()


@pytest.fixture
def issuer(sm_tokens: dict[str, TokenSession]) -> TokenSession:
    return sm_tokens[ISSUER]


@pytest.fixture
def station(sm_tokens: dict[str, TokenSession]) -> TokenSession:
    return sm_tokens[STATION]


def _sm4_kek(session: TokenSession) -> tuple[str, bytes]:
    """An SM4 transport key whose value the test knows (a session object)."""
    value, label = secrets.token_bytes(16), _label("kek-sm4")
    kcv = session.import_transport_key(label, bytearray(value), token=False, algorithm=Algorithm.SM4)
    assert kcv == reference.kcv_sm4(value)
    return label, value


def _master(session: TokenSession, algorithm: Algorithm, value: bytes) -> str:
    label = _label("master")
    session.import_master_key(label, algorithm, bytearray(value), token=False)
    return label


# -- mechanism names -------------------------------------------------------------------------------------------------


@requires_sm
def test_mechanism_names_come_from_the_profile_codes(issuer: TokenSession) -> None:
    offered = issuer.mechanisms()
    assert offered >= SM_NAMES
    assert {"AES_KEY_WRAP_PAD", "DES3_ECB_ENCRYPT_DATA", "EC_KEY_PAIR_GEN", "ECDSA"} <= offered
    for name in SM_NAMES:
        issuer.require(name)  # no error
    assert issuer.profile.name == DEV


@requires_sm
def test_the_same_token_read_with_the_standard_profile_shows_no_sm_mechanisms(issuer: TokenSession) -> None:
    # Another reading of the same session (a token is logged in once per process: no second session here).
    standard = TokenSession(issuer.token_label, issuer._session, mechanisms.load(mechanisms.STANDARD))
    assert not standard.mechanisms() & SM_NAMES
    assert standard.mechanisms() == issuer.mechanisms() - SM_NAMES
    with pytest.raises(MechanismUnavailable, match=rf"SM4_ECB \(token '{ISSUER}'\)"):
        standard.require("SM4_ECB")
    # Another vendor's codes (IBM EP11) name nothing this token lists: conflicting codes are never mixed up.
    ibm = TokenSession(issuer.token_label, issuer._session, mechanisms.load("ibm-ep11"))
    assert not ibm.mechanisms() & SM_NAMES
    with pytest.raises(MechanismUnavailable, match="SM4_KEY_GEN"):
        ibm.generate_master_key(_label("master"), Algorithm.SM4)


# -- SM4 keys ---------------------------------------------------------------------------------------------------------


@requires_sm
def test_sm4_master_keys_generated_and_imported_with_sm4_kcvs(issuer: TokenSession) -> None:
    value = secrets.token_bytes(16)
    imported = _label("master")
    assert issuer.import_master_key(imported, Algorithm.SM4, bytearray(value), token=False) == reference.kcv_sm4(value)
    generated = _label("master")
    kcv = issuer.generate_master_key(generated, Algorithm.SM4)
    escrowable = _label("master")
    issuer.generate_master_key(escrowable, Algorithm.SM4, escrow=True)
    try:
        assert len(kcv) == 3
        infos = {info.label: info for info in issuer.objects()}
        for label in (imported, generated, escrowable):
            info = infos[label]
            assert info.key_type == "SM4"
            assert info.capabilities == frozenset({"DERIVE"})
            assert info.sensitive is True
            assert info.extractable is (label == escrowable)
        assert infos[generated].token is True and infos[generated].never_extractable is True
        assert infos[escrowable].wrap_with_trusted is True
        # The generated key's KCV is SM4-ECB-ZERO16-3 of its value: a card key derived from it with the data
        # 0^16 is SM4_K(0^16), whose first 3 bytes are that KCV.
        kek, kek_value = _sm4_kek(issuer)
        zero = issuer.derive_wrap(generated, ((DeriveStep.SM4_ECB, bytes(16)),), kek)
        issuer.destroy(kek)
        assert _sm4_decrypt(kek_value, zero.wrapped)[:3] == kcv
    finally:
        for label in (imported, generated, escrowable):
            issuer.destroy(label)


@requires_sm
def test_an_sm4_master_key_cannot_be_read_or_wrapped_out(issuer: TokenSession) -> None:
    import pkcs11.exceptions as p11e
    from pkcs11 import Attribute, ObjectClass

    label = _label("master")
    issuer.generate_master_key(label, Algorithm.SM4)
    kek, _ = _sm4_kek(issuer)
    try:
        raw = issuer._session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
        with pytest.raises(p11e.AttributeSensitive):
            raw[Attribute.VALUE]
        with pytest.raises(HsmError, match=r"is not a transport key here \(it may not wrap\)"):
            issuer.derive_wrap(label, ((DeriveStep.SM4_ECB, bytes(16)),), label)  # a master key wraps nothing
        transport = issuer._session.get_key(object_class=ObjectClass.SECRET_KEY, label=kek)
        with pytest.raises((p11e.KeyUnextractable, p11e.KeyNotWrappable)):
            transport.wrap_key(raw, mechanism=issuer._vendor["SM4_ECB"])
    finally:
        issuer.destroy(label)
        issuer.destroy(kek)


# -- derive_wrap ------------------------------------------------------------------------------------------------------


@requires_sm
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_derive_wrap_sm4_steps_equal_the_software_reference(issuer: TokenSession, levels: int) -> None:
    root = secrets.token_bytes(16)
    factors = [secrets.token_bytes(8) for _ in range(levels)]
    master = _master(issuer, Algorithm.SM4, root)
    kek, kek_value = _sm4_kek(issuer)
    try:
        steps = tuple((DeriveStep.SM4_ECB, f + reference.complement(f)) for f in factors)
        result = issuer.derive_wrap(master, steps, kek)
    finally:
        issuer.destroy(master)
        issuer.destroy(kek)
    key = _sm4_decrypt(kek_value, result.wrapped)
    assert key == reference.chain("sm4", root, factors)
    assert result.kcv == reference.kcv_sm4(key)
    assert result.wrap == "SM4-ECB"
    assert len(result.wrapped) == 16  # ECB of one 16-byte key: no padding, no integrity (the KCV checks it)


@requires_sm
def test_the_pboc_sm4_udk_of_a_published_example(issuer: TokenSession) -> None:
    """IMK, PAN, PSN and UDK of the published PBOC SM4 worked example (vectors of the cards helper,
    tests/vectors/sm4.json pboc_sm4_udk[0]: 'Financial ARQC, ARPC verification generation rules', national
    algorithms, iteye.com/blog/scjava-2309584): UDK = SM4_IMK(Y ‖ ~Y), Y = Option A's input."""
    imk = bytes.fromhex("F23BF4AE92B554C116139D4F67322667")
    y = reference.option_a_input("6214988660100000304", "00")
    assert y.hex().upper() == "8866010000030400"
    master = _master(issuer, Algorithm.SM4, imk)
    kek, kek_value = _sm4_kek(issuer)
    try:
        result = issuer.derive_wrap(master, ((DeriveStep.SM4_ECB, y + reference.complement(y)),), kek)
    finally:
        issuer.destroy(master)
        issuer.destroy(kek)
    assert _sm4_decrypt(kek_value, result.wrapped).hex().upper() == "016F6E76BD8E6FB4A17C28C4B05E03A8"
    assert result.kcv.hex().upper() == "CC97D4"


@requires_sm
def test_an_sm4_card_key_under_an_aes_transport_key(issuer: TokenSession) -> None:
    root, factor = secrets.token_bytes(16), secrets.token_bytes(8)
    aes_value, kek = secrets.token_bytes(32), _label("kek-aes")
    issuer.import_transport_key(kek, bytearray(aes_value), token=False)
    master = _master(issuer, Algorithm.SM4, root)
    try:
        result = issuer.derive_wrap(master, ((DeriveStep.SM4_ECB, factor + reference.complement(factor)),), kek)
    finally:
        issuer.destroy(master)
        issuer.destroy(kek)
    assert result.wrap == "AES-KWP"
    key = aes_key_unwrap_with_padding(aes_value, result.wrapped)
    assert key == reference.divsm4(root, factor) and result.kcv == reference.kcv_sm4(key)


@requires_sm
def test_a_3des_card_key_under_an_sm4_transport_key(issuer: TokenSession) -> None:
    root = reference.odd_parity(secrets.token_bytes(16))
    factors = [secrets.token_bytes(8), secrets.token_bytes(8)]
    master = _master(issuer, Algorithm.DES2, root)
    kek, kek_value = _sm4_kek(issuer)
    try:
        steps = tuple((DeriveStep.DES3_ECB, f + reference.complement(f)) for f in factors)
        result = issuer.derive_wrap(master, steps, kek)
    finally:
        issuer.destroy(master)
        issuer.destroy(kek)
    assert result.wrap == "SM4-ECB"
    key = _sm4_decrypt(kek_value, result.wrapped)
    assert key == reference.chain("3des", root, factors)
    assert result.kcv == reference.kcv_tdes(key)


@requires_sm
def test_steps_must_match_their_parent_key(issuer: TokenSession) -> None:
    des2 = _master(issuer, Algorithm.DES2, reference.odd_parity(secrets.token_bytes(16)))
    sm4 = _master(issuer, Algorithm.SM4, secrets.token_bytes(16))
    kek, _ = _sm4_kek(issuer)
    block = bytes(16)
    try:
        with pytest.raises(HsmError, match=r"SM4_ECB_ENCRYPT_DATA steps derive from a SM4 key"):
            issuer.derive_wrap(des2, ((DeriveStep.SM4_ECB, block),), kek)
        with pytest.raises(HsmError, match=r"DES3_ECB_ENCRYPT_DATA steps derive from a DES2 key"):
            issuer.derive_wrap(sm4, ((DeriveStep.DES3_ECB, block),), kek)
        with pytest.raises(HsmError, match="all of one algorithm"):
            issuer.derive_wrap(sm4, ((DeriveStep.SM4_ECB, block), (DeriveStep.DES3_ECB, block)), kek)
        assert not [o for o in issuer.objects() if not o.token and o.label == ""]  # nothing derived is left
    finally:
        for label in (des2, sm4, kek):
            issuer.destroy(label)


# -- transport key hand-off and the station -------------------------------------------------------------------------


@requires_sm
def test_an_sm4_transport_key_handed_to_a_station_unwraps_card_keys_there(issuer: TokenSession,
                                                                         station: TokenSession) -> None:
    unwrap = _label("unwrap")
    station_spki = station.generate_unwrap_keypair(unwrap)
    transport = _label("transport")
    wrapped, issuer_kcv = issuer.generate_transport_key_for(transport, station_spki, algorithm=Algorithm.SM4)
    assert station.accept_transport_key(unwrap, wrapped, transport, algorithm=Algorithm.SM4) == issuer_kcv
    infos = {info.label: info for info in station.objects()}
    assert infos[transport].key_type == "SM4" and infos[transport].capabilities == frozenset({"UNWRAP"})
    assert {info.label: info for info in issuer.objects()}[transport].extractable is False

    sm4_root, des_root = secrets.token_bytes(16), reference.odd_parity(secrets.token_bytes(16))
    factor = secrets.token_bytes(8)
    sm4_master, des_master = _master(issuer, Algorithm.SM4, sm4_root), _master(issuer, Algorithm.DES2, des_root)
    try:
        sm4_key = issuer.derive_wrap(sm4_master, ((DeriveStep.SM4_ECB, factor + reference.complement(factor)),),
                                     transport)
        des_key = issuer.derive_wrap(des_master, ((DeriveStep.DES3_ECB, factor + reference.complement(factor)),),
                                     transport)
    finally:
        issuer.destroy(sm4_master)
        issuer.destroy(des_master)
    assert sm4_key.kcv == reference.kcv_sm4(reference.divsm4(sm4_root, factor))
    assert des_key.kcv == reference.kcv_tdes(reference.div3des(des_root, factor))

    keys = station.unwrap_card_keys(transport, [(sm4_key.wrapped, Algorithm.SM4), (des_key.wrapped, Algorithm.DES2)])
    assert keys.kcvs == [sm4_key.kcv, des_key.kcv]
    labels = [_label("card-sm4"), _label("card-des")]
    stored = store_station_keys(station, [(keys, labels)])
    try:
        infos = {info.label: info for info in station.objects()}
        assert [infos[label].key_type for label in labels] == ["SM4", "DES2"]
        assert all(infos[label].extractable is False and infos[label].capabilities == frozenset({"ENCRYPT"})
                   for label in labels)
    finally:
        for obj in stored:
            obj.destroy()

    # SM4-ECB has no integrity: an altered wrapped key unwraps to another key, which its KCV gives away.
    altered = bytes([sm4_key.wrapped[0] ^ 1]) + sm4_key.wrapped[1:]
    other = station.unwrap_card_keys(transport, [(altered, Algorithm.SM4)])
    assert other.kcvs != [sm4_key.kcv]
    with pytest.raises(HsmError):  # not a whole number of blocks
        station.unwrap_card_keys(transport, [(sm4_key.wrapped[:15], Algorithm.SM4)])


@requires_sm
def test_an_imported_sm4_transport_key_wraps_only(issuer: TokenSession) -> None:
    label, _value = _sm4_kek(issuer)
    try:
        info = {i.label: i for i in issuer.objects()}[label]
        assert info.key_type == "SM4" and info.capabilities == frozenset({"WRAP"})
    finally:
        issuer.destroy(label)
    generated = _label("transport")
    kcv = issuer.generate_transport_key(generated, algorithm=Algorithm.SM4)
    assert len(kcv) == 3
    issuer.destroy(generated)
    with pytest.raises(HsmError, match="transport keys are AES-256 or SM4"):
        issuer.import_transport_key(_label("t"), bytearray(16), algorithm=Algorithm.DES2)


# -- SM2 and SM3 ------------------------------------------------------------------------------------------------------


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        pytest.skip("the openssl command is not installed")
    return found


def _pem(der: bytes, path: Path) -> Path:
    """A public key file OpenSSL reads (its own conversion of our DER: a failure here is a malformed SPKI)."""
    (path.with_suffix(".der")).write_bytes(der)
    subprocess.run([_openssl(), "pkey", "-pubin", "-inform", "DER", "-in", str(path.with_suffix(".der")),
                    "-out", str(path)], check=True, capture_output=True)
    return path


@requires_sm
def test_sm2_signatures_verify_in_the_token_and_with_openssl(issuer: TokenSession, station: TokenSession,
                                                             tmp_path: Path) -> None:
    label = _label("signing")
    public = issuer.generate_signing_key(label, SignatureAlgorithm.SM2_SM3)
    assert spki.is_sm2(public) and issuer.public_key(label) == public
    message = b"section: " + secrets.token_bytes(200)
    signature = issuer.sign(label, message, SignatureAlgorithm.SM2_SM3)
    assert len(signature) == 64
    assert station.verify(public, message, signature, SignatureAlgorithm.SM2_SM3) is True
    assert station.verify(public, message + b"x", signature, SignatureAlgorithm.SM2_SM3) is False
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    assert station.verify(public, message, tampered, SignatureAlgorithm.SM2_SM3) is False
    assert station.verify(public, message, signature[:63], SignatureAlgorithm.SM2_SM3) is False

    # Independently: OpenSSL 3 reads the SPKI as an SM2 key and checks the signature (DER r, s) with SM3 and the
    # GM/T 0009 default ID.
    openssl = _openssl()
    pem = _pem(public, tmp_path / "sm2.pem")
    text = subprocess.run([openssl, "pkey", "-pubin", "-in", str(pem), "-text_pub", "-noout"], check=True,
                          capture_output=True, text=True).stdout
    assert "SM2" in text
    (tmp_path / "msg").write_bytes(message)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    (tmp_path / "sig").write_bytes(encode_dss_signature(r, s))
    verify = [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(pem), "-rawin", "-in", str(tmp_path / "msg"),
              "-sigfile", str(tmp_path / "sig"), "-digest", "sm3"]
    ok = subprocess.run([*verify, "-pkeyopt", f"distid:{DEFAULT_ID}"], capture_output=True, text=True)
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok.stdout + ok.stderr
    other_id = subprocess.run([*verify, "-pkeyopt", "distid:another-identity"], capture_output=True, text=True)
    assert other_id.returncode != 0  # Z_A binds the identity: the default one is what the token used
    issuer.destroy(label, "private")
    issuer.destroy(label, "public")


@requires_sm
def test_an_openssl_sm2_signature_verifies_in_the_token(station: TokenSession, tmp_path: Path) -> None:
    openssl = _openssl()
    key = tmp_path / "sm2.pem"
    subprocess.run([openssl, "genpkey", "-algorithm", "SM2", "-out", str(key)], check=True, capture_output=True)
    public = subprocess.run([openssl, "pkey", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                            capture_output=True).stdout
    message = secrets.token_bytes(300)
    (tmp_path / "msg").write_bytes(message)
    der = subprocess.run([openssl, "pkeyutl", "-sign", "-inkey", str(key), "-rawin", "-in", str(tmp_path / "msg"),
                          "-digest", "sm3", "-pkeyopt", f"distid:{DEFAULT_ID}"], check=True,
                         capture_output=True).stdout
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert station.verify(public, message, signature, SignatureAlgorithm.SM2_SM3) is True
    assert station.verify(public, message[:-1], signature, SignatureAlgorithm.SM2_SM3) is False


@requires_sm
def test_ecdsa_p256_in_the_same_verbs(issuer: TokenSession, station: TokenSession) -> None:
    label = _label("signing")
    public = issuer.generate_signing_key(label)
    message = secrets.token_bytes(100)
    signature = issuer.sign(label, message, SignatureAlgorithm.ECDSA_P256_SHA256)
    assert station.verify(public, message, signature, SignatureAlgorithm.ECDSA_P256_SHA256) is True
    assert station.verify(public, message + b"!", signature, SignatureAlgorithm.ECDSA_P256_SHA256) is False
    loaded = serialization.load_der_public_key(public)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    loaded.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes_sha256()))
    # One algorithm's key is refused for the other's signature.
    with pytest.raises(HsmError, match="is not a key for SM2-SM3"):
        issuer.sign(label, message, SignatureAlgorithm.SM2_SM3)
    with pytest.raises(InvalidArgument, match="public_key: is not an SM2 public key"):
        station.verify(public, message, signature, SignatureAlgorithm.SM2_SM3)
    sm2 = issuer.generate_signing_key(_label("signing"), SignatureAlgorithm.SM2_SM3)
    with pytest.raises(InvalidArgument, match="public_key: is not an ECDSA P-256 public key"):
        station.verify(sm2, message, signature, SignatureAlgorithm.ECDSA_P256_SHA256)
    issuer.destroy(label, "private")
    issuer.destroy(label, "public")


def hashes_sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


@requires_sm
@pytest.mark.parametrize("data", [b"", b"abc", b"abcd" * 16, secrets.token_bytes(5000)])
def test_sm3_digests_equal_hashlib(issuer: TokenSession, data: bytes) -> None:
    assert issuer.digest_sm3(data) == hashlib.new("sm3", data).digest()
    if data == b"abc":  # GB/T 32905-2016 Appendix A example 1
        assert issuer.digest_sm3(data).hex() == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"


# -- a token without SM: every SM verb is MechanismUnavailable, naming the mechanism and the token ------------------


def _every_sm_verb(session: TokenSession) -> dict[str, Any]:
    rsa_spki = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    kek = _label("kek-aes")
    session.import_transport_key(kek, bytearray(secrets.token_bytes(32)), token=False)
    des = _label("master")
    session.import_master_key(des, Algorithm.DES2, bytearray(reference.odd_parity(secrets.token_bytes(16))),
                              token=False)
    p256 = _label("signing")
    p256_spki = session.generate_signing_key(p256)
    sm2_spki = spki.sm2_spki(b"\x04" + bytes(64))
    verbs: dict[str, Any] = {
        "SM4_KEY_GEN": [lambda: session.generate_master_key(_label("m"), Algorithm.SM4),
                        lambda: session.generate_transport_key(_label("t"), algorithm=Algorithm.SM4),
                        lambda: session.generate_transport_key_for(_label("t"), rsa_spki, algorithm=Algorithm.SM4)],
        "SM4_ECB": [lambda: session.import_master_key(_label("m"), Algorithm.SM4, bytearray(16)),
                    lambda: session.import_transport_key(_label("t"), bytearray(16), algorithm=Algorithm.SM4),
                    lambda: session.accept_transport_key(_label("u"), b"x" * 256, _label("t"),
                                                         algorithm=Algorithm.SM4),
                    lambda: session.unwrap_card_keys(kek, [(bytes(24), Algorithm.SM4)])],
        "SM4_ECB_ENCRYPT_DATA": [lambda: session.derive_wrap(des, ((DeriveStep.SM4_ECB, bytes(16)),), kek)],
        "SM2_SM3": [lambda: session.generate_signing_key(_label("s"), SignatureAlgorithm.SM2_SM3),
                    lambda: session.sign(p256, b"m", SignatureAlgorithm.SM2_SM3),
                    lambda: session.verify(sm2_spki, b"m", bytes(64), SignatureAlgorithm.SM2_SM3)],
        "SM3": [lambda: session.digest_sm3(b"abc")],
    }
    assert spki.is_sm2(p256_spki) is False

    def cleanup() -> None:
        session.destroy(kek)
        session.destroy(des)
        session.destroy(p256, "private")
        session.destroy(p256, "public")

    verbs["_cleanup"] = cleanup
    return verbs


def _assert_all_unavailable(session: TokenSession) -> None:
    verbs = _every_sm_verb(session)
    cleanup = verbs.pop("_cleanup")
    try:
        for mechanism, calls in verbs.items():
            for call in calls:
                with pytest.raises(MechanismUnavailable) as raised:
                    call()
                assert raised.value.mechanism == mechanism
                assert str(raised.value).endswith(
                    f"mechanism not available on this HSM: {mechanism} (token {session.token_label!r})")
    finally:
        cleanup()


def test_every_sm_verb_is_unavailable_on_plain_softhsm(sessions: dict[str, TokenSession]) -> None:
    """The system's SoftHSM2 with the standard profile (the default): no SM names at all."""
    session = sessions["hrss"]
    assert session.profile.name == mechanisms.STANDARD
    assert not session.mechanisms() & SM_NAMES
    _assert_all_unavailable(session)


@pytest.mark.parametrize("profile", [DEV, "ibm-ep11"])
def test_every_sm_verb_is_unavailable_on_plain_softhsm_read_with_an_sm_profile(
        cfg: config.Config, sessions: dict[str, TokenSession], profile: str) -> None:
    """An SM profile on a module that lists none of its codes: still refused, never computed."""
    module = runtime.module(dataclasses.replace(cfg.hsm, mechanisms=profile))
    assert module.mechanisms.name == profile and module._lib is runtime.module(cfg.hsm)._lib  # one library
    # The same logged-in session read with the development profile (a second login to the token would be refused).
    session = TokenSession(sessions["hrss"].token_label, sessions["hrss"]._session, module.mechanisms)
    assert not session.mechanisms() & SM_NAMES
    _assert_all_unavailable(session)


# -- review s22: what derive_wrap works out once per session follows a key destroyed and replaced -----------------


@requires_sm
def test_wrap_method_is_the_transport_keys_type(issuer: TokenSession) -> None:
    label, _ = _sm4_kek(issuer)
    assert issuer.wrap_method(label) == "SM4-ECB"
    aes = _label("kek-aes")
    issuer.import_transport_key(aes, bytearray(secrets.token_bytes(32)), token=False)
    assert issuer.wrap_method(aes) == "AES-KWP"
    master = _master(issuer, Algorithm.SM4, secrets.token_bytes(16))
    with pytest.raises(HsmError, match="is not a transport key here"):
        issuer.wrap_method(master)


def test_a_transport_key_destroyed_and_replaced_under_its_label_wraps_under_the_new_key(issuer: TokenSession) -> None:
    """derive_wrap reads a transport key's object and wrap method once per session: destroying the key through this
    session and making another under the same label (here an AES key in place of an SM4 one) must not leave the
    old object and method in use."""
    root, factor = reference.odd_parity(secrets.token_bytes(16)), secrets.token_bytes(8)
    master = _master(issuer, Algorithm.DES2, root)
    steps = ((DeriveStep.DES3_ECB, factor + reference.complement(factor)),)
    kek, sm4_value = _sm4_kek(issuer)
    try:
        first = issuer.derive_wrap(master, steps, kek)
        assert first.wrap == "SM4-ECB" and _sm4_decrypt(sm4_value, first.wrapped) == reference.div3des(root, factor)
        issuer.destroy(kek)
        aes_value = secrets.token_bytes(32)
        issuer.import_transport_key(kek, bytearray(aes_value), token=False)
        second = issuer.derive_wrap(master, steps, kek)
    finally:
        issuer.destroy(master)
        issuer.destroy(kek)
    assert second.wrap == "AES-KWP"
    assert aes_key_unwrap_with_padding(aes_value, second.wrapped) == reference.div3des(root, factor)


@requires_sm
def test_a_master_key_destroyed_and_replaced_by_another_type_is_checked_again(issuer: TokenSession) -> None:
    """derive_wrap checks a master key's type against its steps once per (label, kind of step) and session: a DES2
    master destroyed and replaced under its label by an SM4 key must meet the same clear refusal as any SM4 key
    given DES3_ECB steps, not reach the token."""
    master = _master(issuer, Algorithm.DES2, reference.odd_parity(secrets.token_bytes(16)))
    kek, _ = _sm4_kek(issuer)
    block = bytes(16)
    try:
        issuer.derive_wrap(master, ((DeriveStep.DES3_ECB, block),), kek)
        issuer.destroy(master)
        issuer.import_master_key(master, Algorithm.SM4, bytearray(secrets.token_bytes(16)), token=False)
        with pytest.raises(HsmError, match=r"DES3_ECB_ENCRYPT_DATA steps derive from a DES2 key"):
            issuer.derive_wrap(master, ((DeriveStep.DES3_ECB, block),), kek)
        assert not [o for o in issuer.objects() if not o.token and o.label == ""]  # nothing derived is left
    finally:
        issuer.destroy(master)
        issuer.destroy(kek)


@requires_sm
def test_an_sm4_transport_key_given_as_a_master_key_is_a_clear_hsm_error(issuer: TokenSession) -> None:
    """A transport key is no master key, whatever its type: an SM4 transport key given SM4 steps (its type matches
    them) is refused with an HsmError, not an AttributeError of python-pkcs11 (INTERNAL)."""
    kek, _ = _sm4_kek(issuer)
    try:
        with pytest.raises(HsmError, match=r"is not a master key here \(it may not derive\)"):
            issuer.derive_wrap(kek, ((DeriveStep.SM4_ECB, bytes(16)),), kek)
        assert not [o for o in issuer.objects() if not o.token and o.label == ""]
    finally:
        issuer.destroy(kek)


# -- review s23: an SM4 transport key read with a mechanism profile that names no SM4 ------------------------------


@requires_sm
def test_an_sm4_transport_key_read_without_an_sm4_profile_is_mechanism_unavailable(issuer: TokenSession,
                                                                                   station: TokenSession) -> None:
    """A token that holds an SM4 transport key, read with a profile that names no SM4 (a configuration that lost its
    ``hsm.mechanisms``): the port says SM4-ECB is not available, as it does for every other SM verb, and a station
    passes that on. Before review s23 it said the key "is not a transport key (AES or SM4)" (a plain HsmError), so the
    station refused every SM4-ECB section as an opaque "bundle rejected" (logged: "unwrap"), whatever the bundle."""
    from kms.station import Station, TrustStore, _Section

    unwrap, transport = _label("unwrap"), _label("transport")
    wrapped, issuer_kcv = issuer.generate_transport_key_for(transport, station.generate_unwrap_keypair(unwrap),
                                                            algorithm=Algorithm.SM4)
    assert station.accept_transport_key(unwrap, wrapped, transport, algorithm=Algorithm.SM4) == issuer_kcv
    standard = mechanisms.load(mechanisms.STANDARD)
    try:
        plain_station = TokenSession(station.token_label, station._session, standard)
        with pytest.raises(MechanismUnavailable, match=r"SM4_ECB \(token "):
            plain_station.transport_wrap(transport)
        plain_issuer = TokenSession(issuer.token_label, issuer._session, standard)
        with pytest.raises(MechanismUnavailable, match=r"SM4_ECB \(token "):
            plain_issuer.wrap_method(transport)

        opener = Station("station-x", "bureau-x", ("bank",), plain_station, TrustStore({}), cast(Any, None),
                         cast(Any, None))
        section = _Section("bank", transport, ((secrets.token_bytes(16), Algorithm.SM4),),
                           (("k", "u", "SM4", "SM4-ECB-ZERO16-3", "000000"),), "SM4-ECB")
        with pytest.raises(MechanismUnavailable, match="SM4_ECB"):
            opener._unwrap(section)
    finally:
        station.destroy(transport)
        issuer.destroy(transport)


@requires_sm
def test_a_station_pin_holder_cannot_sm4_unwrap_a_sealed_key_as_readable(issuer: TokenSession,
                                                                        station: TokenSession) -> None:
    """Review s23, checked and found right: the station transport key's CKA_UNWRAP_TEMPLATE holds for SM4-ECB as for
    AES key wrap (tests/hsm/test_hsm.py): with the station PIN and raw PKCS#11, a sealed card key cannot be unwrapped
    as readable, extractable or able to decrypt, as an SM4 key or as a key of another type."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    unwrap, transport = _label("unwrap"), _label("transport")
    wrapped, issuer_kcv = issuer.generate_transport_key_for(transport, station.generate_unwrap_keypair(unwrap),
                                                            algorithm=Algorithm.SM4)
    assert station.accept_transport_key(unwrap, wrapped, transport, algorithm=Algorithm.SM4) == issuer_kcv
    master = _master(issuer, Algorithm.SM4, secrets.token_bytes(16))
    session_objects = len([o for o in station.objects() if not o.token])  # other tests' keys kept to verify with
    try:
        factor = secrets.token_bytes(8)
        sealed = issuer.derive_wrap(master, ((DeriveStep.SM4_ECB, factor + reference.complement(factor)),),
                                    transport)
        key = station._session.get_key(object_class=ObjectClass.SECRET_KEY, label=transport)
        key.key_type = station._ckk_sm4
        sm4_ecb = station._vendor["SM4_ECB"]
        pinned = {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                  Attribute.DECRYPT: False, Attribute.ENCRYPT: True}
        for key_type in (station._ckk_sm4, KeyType.AES, KeyType.GENERIC_SECRET):
            for template in ({Attribute.SENSITIVE: False}, {Attribute.EXTRACTABLE: True}, {Attribute.DECRYPT: True}):
                with pytest.raises(pkcs11.exceptions.TemplateInconsistent):
                    key.unwrap_key(ObjectClass.SECRET_KEY, key_type, sealed.wrapped, mechanism=sm4_ecb,
                                   capabilities=0, template={**pinned, **template})
        control = key.unwrap_key(ObjectClass.SECRET_KEY, station._ckk_sm4, sealed.wrapped, mechanism=sm4_ecb,
                                 capabilities=0, template=pinned)  # the template the station's key allows
        control.key_type = station._ckk_sm4
        assert bytes(control.encrypt(bytes(16), mechanism=sm4_ecb))[:3] == sealed.kcv
        control.destroy()
        assert len([o for o in station.objects() if not o.token]) == session_objects  # nothing left
    finally:
        issuer.destroy(master)
        station.destroy(transport)
        issuer.destroy(transport)
