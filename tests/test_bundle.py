"""kms.bundle, pure parts: canonical JSON, assembly, and strict parsing (no HSM, fake signatures)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms import bundle
from kms.errors import BundleRejected

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SERIAL = "0123456789ABCDEF0123456789ABCDEF"
CARD_REF = "card-0001"
SIG = {"bank": bytes(range(64)), "hrss": bytes(range(64, 128))}
KEY_ID = {"bank": "AA" * 16, "hrss": "BB" * 16}


def _header(domain: str, serial: str = SERIAL, card_ref: str = CARD_REF) -> bundle.SectionHeader:
    return bundle.SectionHeader(
        serial=serial, domain=domain, bureau="bureau-a", batch="batch-7", card_ref=card_ref, profile="dual-app-v1",
        created_at="2024-05-01T08:00:00Z", master_keys={f"{domain}-mk": 2}, transport_key="bureau-a",
        transport_key_version=3, transport_key_kcv="ABCDEF", domains=("bank", "hrss"),
    )


def _keys(domain: str) -> list[bundle.SealedKey]:
    return [
        bundle.SealedKey(name=f"{domain}-k1", usage="u1", algorithm="DES2", wrapped=bytes(range(24)),
                         kcv=bytes.fromhex("C64DC2"), kcv_method="TDES-ECB-ZERO8-3"),
        bundle.SealedKey(name=f"{domain}-k2", usage="u2", algorithm="DES2", wrapped=bytes(24), kcv=b"\x01\x02\x03",
                         kcv_method="TDES-ECB-ZERO8-3"),
    ]


def _section_bytes(domain: str, **header: str) -> bytes:
    body = bundle.section_body(_header(domain, **header), _keys(domain))
    return bundle.encode_section(bundle.section(body, KEY_ID[domain], SIG[domain]))


def _good() -> bytes:
    return bundle.assemble(SERIAL, CARD_REF, {"hrss": _section_bytes("hrss"), "bank": _section_bytes("bank")})


def _doc() -> dict[str, Any]:
    return json.loads(_good())


def _rejected(data: bytes) -> None:
    with pytest.raises(BundleRejected) as info:
        bundle.parse(data)
    assert str(info.value) == "bundle rejected"
    assert info.value.__cause__ is None  # opaque: the underlying reason is not chained


def _compact(doc: Any) -> bytes:
    """Sorted and compact like canonical(), but allows floats, so a test can smuggle one in."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _compact_unsorted(doc: dict[str, Any]) -> bytes:
    """Compact, keys in reverse order at the top level."""
    return json.dumps(dict(reversed(list(doc.items()))), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- canonical -----------------------------------------------------------------------------------------------------


def test_canonical_sorted_and_compact() -> None:
    value = {"b": 1, "a": [3, "x", {"d": "", "c": -2}], "é": "社保"}
    assert bundle.canonical(value) == '{"a":[3,"x",{"c":-2,"d":""}],"b":1,"é":"社保"}'.encode()


@pytest.mark.parametrize("bad", [1.0, True, False, None, {"a": 0.5}, [1, None], {"a": {"b": [True]}}, b"x", (1, 2)])
def test_canonical_rejects_other_types(bad: Any) -> None:
    with pytest.raises(TypeError):
        bundle.canonical(bad)


def test_canonical_rejects_non_string_keys() -> None:
    with pytest.raises(TypeError):
        bundle.canonical({1: "a"})


_json = st.recursive(
    st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(_json)
def test_canonical_round_trips_and_is_a_fixed_point(value: Any) -> None:
    encoded = bundle.canonical(value)
    assert json.loads(encoded) == value
    assert bundle.canonical(json.loads(encoded)) == encoded
    assert encoded == _compact(value)


def test_hexs_is_upper_case() -> None:
    assert bundle.hexs(b"\xab\x01") == "AB01"


# -- assemble ------------------------------------------------------------------------------------------------------


def test_assemble_equals_canonical_of_the_whole_document() -> None:
    sections = {"hrss": _section_bytes("hrss"), "bank": _section_bytes("bank")}
    expected = bundle.canonical({
        "format": "kms-sealed-bundle",
        "version": 1,
        "serial": SERIAL,
        "card_ref": CARD_REF,
        "sections": [json.loads(sections["bank"]), json.loads(sections["hrss"])],  # ordered by domain
    })
    assert bundle.assemble(SERIAL, CARD_REF, sections) == expected


def test_assemble_one_section() -> None:
    data = bundle.assemble(SERIAL, CARD_REF, {"hrss": _section_bytes("hrss")})
    assert json.loads(data)["sections"] == [json.loads(_section_bytes("hrss"))]
    assert bundle.canonical(json.loads(data)) == data


def test_signed_bytes_are_context_then_canonical_body() -> None:
    body = bundle.section_body(_header("hrss"), _keys("hrss"))
    assert bundle.signed_bytes(body) == b"kms-sealed-section/v1\x00" + bundle.canonical(body)


# -- parse: a well-formed bundle -----------------------------------------------------------------------------------


def test_parse_well_formed_bundle() -> None:
    parsed = bundle.parse(_good())
    assert parsed.serial == SERIAL
    assert parsed.card_ref == CARD_REF
    assert [s.domain for s in parsed.sections] == ["bank", "hrss"]
    for s in parsed.sections:
        assert s.serial == SERIAL
        assert s.card_ref == CARD_REF
        assert s.bureau == "bureau-a"
        assert s.transport_key == "bureau-a"
        assert s.transport_key_version == 3
        assert s.key_id == KEY_ID[s.domain]
        assert s.signature == SIG[s.domain]
        assert s.body == bundle.section_body(_header(s.domain), _keys(s.domain))
        assert s.signed_bytes == bundle.signed_bytes(bundle.section_body(_header(s.domain), _keys(s.domain)))
        assert s.keys == tuple(
            bundle.ParsedKey(name=k.name, usage=k.usage, algorithm=k.algorithm, wrapped=k.wrapped, kcv=k.kcv,
                             kcv_method=k.kcv_method)
            for k in _keys(s.domain)
        )


def test_parse_accepts_a_bundle_close_to_the_size_limit() -> None:
    big = bundle.SealedKey(name="big", usage="u", algorithm="DES2", wrapped=bytes(bundle.MAX_BUNDLE_BYTES // 2 - 2048),
                           kcv=b"\x00\x00\x00", kcv_method="m")
    body = bundle.section_body(_header("bank"), [big])
    data = bundle.assemble(SERIAL, CARD_REF, {"bank": bundle.encode_section(bundle.section(body, "K", SIG["bank"]))})
    assert len(data) <= bundle.MAX_BUNDLE_BYTES
    assert bundle.parse(data).sections[0].keys[0].wrapped == big.wrapped


# -- parse: rejections ---------------------------------------------------------------------------------------------


def _sig(doc: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return doc["sections"][i]["signature"]


def _body(doc: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return doc["sections"][i]["body"]


def _mutations() -> list[pytest.ParameterSet]:
    def case(name: str) -> Callable[[Callable[[dict[str, Any]], None]], Callable[[dict[str, Any]], None]]:
        def register(fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
            found.append(pytest.param(fn, id=name))
            return fn
        return register

    found: list[pytest.ParameterSet] = []

    case("lower-case signature hex")(lambda d: _sig(d).update(value=_sig(d)["value"].lower()))
    case("lower-case wrapped key hex")(lambda d: _body(d)["keys"][0].update(wrapped=_body(d)["keys"][0]["wrapped"]
                                                                            .lower()))
    case("odd-length hex")(lambda d: _body(d)["keys"][0].update(kcv="ABC"))
    case("extra top-level field")(lambda d: d.update(extra="x"))
    case("extra body field")(lambda d: _body(d).update(note="x"))
    case("extra signature field")(lambda d: _sig(d).update(note="x"))
    case("extra key field")(lambda d: _body(d)["keys"][0].update(note="x"))
    case("extra transport_key field")(lambda d: _body(d)["transport_key"].update(note="x"))
    case("missing top-level field")(lambda d: d.pop("card_ref"))
    case("missing body field")(lambda d: _body(d).pop("batch"))
    case("missing key field")(lambda d: _body(d)["keys"][0].pop("kcv"))
    case("missing signature field")(lambda d: _sig(d).pop("key_id"))
    case("unknown bundle format")(lambda d: d.update(format="kms-sealed-bundle-x"))
    case("unknown bundle version")(lambda d: d.update(version=2))
    case("unknown section format")(lambda d: _body(d).update(format="kms-sealed-bundle"))
    case("unknown section version")(lambda d: _body(d).update(version=0))
    case("unknown signature algorithm")(lambda d: _sig(d).update(algorithm="RSA-PSS-SHA256"))
    case("unknown wrap algorithm")(lambda d: _body(d)["keys"][0].update(wrap="AES-KW"))
    case("lower-case SM2 algorithm")(lambda d: _sig(d).update(algorithm="sm2-sm3"))
    case("SM2 without SM3")(lambda d: _sig(d).update(algorithm="SM2"))
    case("lower-case SM4 wrap")(lambda d: _body(d)["keys"][0].update(wrap="sm4-ecb"))
    case("two wrap methods in one section")(lambda d: _body(d)["keys"][0].update(wrap="SM4-ECB"))
    case("signature 63 bytes")(lambda d: _sig(d).update(value="00" * 63))
    case("signature 65 bytes")(lambda d: _sig(d).update(value="00" * 65))
    case("empty signature")(lambda d: _sig(d).update(value=""))
    case("sections out of domain order")(lambda d: d["sections"].reverse())
    case("section duplicated")(lambda d: d["sections"].__setitem__(1, copy.deepcopy(d["sections"][0])))
    case("empty sections list")(lambda d: d["sections"].clear())
    case("sections not a list")(lambda d: d.update(sections=d["sections"][0]))
    case("section serial differs from envelope")(lambda d: _body(d, 1).update(serial="F" * 32))
    case("envelope serial differs from sections")(lambda d: d.update(serial="F" * 32))
    case("section card_ref differs from envelope")(lambda d: _body(d).update(card_ref="card-0002"))
    case("envelope card_ref differs from sections")(lambda d: d.update(card_ref="card-0002"))
    case("no keys in a section")(lambda d: _body(d)["keys"].clear())
    case("master_keys not an object")(lambda d: _body(d).update(master_keys=["x"]))
    case("serial not a string")(lambda d: [d.update(serial=1), *(s["body"].update(serial=1) for s in d["sections"])])
    case("transport key version not an int")(lambda d: _body(d)["transport_key"].update(version="3"))
    case("bundle wrapped in another object")(lambda d: (lambda s: (d.clear(), d.update(bundle=s)))(dict(d)))
    return found


@pytest.mark.parametrize("mutate", _mutations())
def test_parse_rejects(mutate: Callable[[dict[str, Any]], None]) -> None:
    doc = _doc()
    mutate(doc)
    data = bundle.canonical(doc)  # still canonical: only the content is wrong
    assert data != _good()
    _rejected(data)


@pytest.mark.parametrize(
    "separators",
    [pytest.param((", ", ":"), id="space after comma"), pytest.param((",", ": "), id="space after colon")],
)
def test_parse_rejects_non_canonical_whitespace(separators: tuple[str, str]) -> None:
    _rejected(json.dumps(_doc(), sort_keys=True, separators=separators, ensure_ascii=False).encode())


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda good: good + b"\n", id="trailing newline"),
        pytest.param(lambda good: b" " + good, id="leading space"),
        pytest.param(lambda good: _compact_unsorted(json.loads(good)), id="unsorted keys"),
        pytest.param(lambda good: good.replace(b"card-0001", b"card-\\u0030001"), id="needless escape"),
        pytest.param(lambda good: good.replace(b'"version":1}', b'"version":1.0}'), id="float version"),
        pytest.param(lambda good: good.replace(b'"version":1}', b'"version":1e0}'), id="exponent version"),
        pytest.param(lambda good: good.replace(b'"version":1}', b'"version":NaN}'), id="NaN"),
        pytest.param(lambda good: good.replace(b'"version":1}', b'"version":true}'), id="bool version"),
        pytest.param(lambda good: good.replace(b"card-0001", b"card-\xff001"), id="invalid UTF-8"),
        pytest.param(lambda good: good.replace(b'{"card_ref":"card-0001",', b'{"card_ref":"card-0001",'
                                               b'"card_ref":"card-0001",', 1), id="duplicate JSON key"),
        pytest.param(lambda good: b"", id="empty"),
        pytest.param(lambda good: good[:-1], id="truncated"),
    ],
)
def test_parse_rejects_bytes(data: Callable[[bytes], bytes]) -> None:
    good = _good()
    mutated = data(good)
    assert mutated != good
    _rejected(mutated)


def test_parse_rejects_a_list_at_top_level() -> None:
    _rejected(bundle.canonical([_doc()]))


def test_parse_rejects_float_anywhere() -> None:
    doc = _doc()
    _body(doc)["transport_key"]["version"] = 3.0
    _rejected(_compact(doc))


def test_parse_rejects_duplicate_key_in_a_section() -> None:
    good = _good()
    data = good.replace(b'"batch":"batch-7",', b'"batch":"batch-7","batch":"batch-7",', 1)
    assert data.count(b'"batch"') == good.count(b'"batch"') + 1
    _rejected(data)


def test_parse_rejects_oversize_input() -> None:
    big = bundle.SealedKey(name="big", usage="u", algorithm="DES2", wrapped=bytes(bundle.MAX_BUNDLE_BYTES // 2 + 1),
                           kcv=b"\x00\x00\x00", kcv_method="m")
    body = bundle.section_body(_header("bank"), [big])
    data = bundle.assemble(SERIAL, CARD_REF, {"bank": bundle.encode_section(bundle.section(body, "K", SIG["bank"]))})
    assert len(data) > bundle.MAX_BUNDLE_BYTES
    _rejected(data)


def test_parse_rejects_hex_with_trailing_newline() -> None:
    doc = _doc()
    _sig(doc)["value"] += "\n"
    _rejected(bundle.canonical(doc))


def test_parse_rejects_deep_nesting() -> None:
    depth = 100_000
    _rejected(b"[" * depth + b"]" * depth)


@pytest.mark.parametrize("value", [
    pytest.param(None, id="null"), pytest.param(True, id="true"), pytest.param(False, id="false"),
    pytest.param([1, [None]], id="null in a nested list"), pytest.param([[{"a": [True]}]], id="true deep in lists"),
])
def test_parse_rejects_constants_anywhere(value: Any) -> None:
    # the object hook refuses them as the document is read (no second walk over it); the bytes are otherwise
    # canonical, so nothing else would refuse them
    doc = _doc()
    _body(doc)["master_keys"]["extra"] = value
    data = _compact(doc)
    assert json.loads(data)["sections"][0]["body"]["master_keys"]["extra"] == value
    _rejected(data)


def test_parse_keeps_the_signed_bytes_as_read() -> None:
    good = _good()
    for section in bundle.parse(good).sections:
        assert section.body_bytes in good
        assert section.signed_bytes == bundle.SIGNING_CONTEXT + section.body_bytes


# -- SM: SM2-SM3 section signatures, SM4-ECB wrapped keys (issue 14); ECDSA/AES bundles exactly as before --------


def _sm_keys(domain: str) -> list[bundle.SealedKey]:
    return [
        bundle.SealedKey(name=f"{domain}-k1", usage="u1", algorithm="SM4", wrapped=bytes(range(16)),
                         kcv=bytes.fromhex("9F1F7B"), kcv_method="SM4-ECB-ZERO16-3", wrap="SM4-ECB"),
        bundle.SealedKey(name=f"{domain}-k2", usage="u2", algorithm="DES2", wrapped=bytes(16), kcv=b"\x01\x02\x03",
                         kcv_method="TDES-ECB-ZERO8-3", wrap="SM4-ECB"),
    ]


def _sm_bundle() -> bytes:
    bank = bundle.section_body(_header("bank"), _sm_keys("bank"))
    hrss = bundle.section_body(_header("hrss"), _keys("hrss"))
    return bundle.assemble(SERIAL, CARD_REF, {
        "bank": bundle.encode_signed_section(bundle.canonical(bank), KEY_ID["bank"], SIG["bank"], "SM2-SM3"),
        "hrss": bundle.encode_section(bundle.section(hrss, KEY_ID["hrss"], SIG["hrss"])),
    })


def test_an_sm_section_parses_with_its_algorithm_and_wrap_beside_an_ecdsa_one() -> None:
    parsed = bundle.parse(_sm_bundle())
    bank, hrss = parsed.sections
    assert (bank.signature_algorithm, hrss.signature_algorithm) == ("SM2-SM3", "ECDSA-P256-SHA256")
    assert [k.wrap for k in bank.keys] == ["SM4-ECB", "SM4-ECB"]
    assert [k.wrap for k in hrss.keys] == ["AES-KWP", "AES-KWP"]
    assert bank.keys == tuple(_sm_keys("bank"))
    assert bank.signature == SIG["bank"] and len(bank.signature) == 64
    # the same signed bytes as an ECDSA section: the context string and the body
    assert bank.signed_bytes == bundle.SIGNING_CONTEXT + bundle.canonical(bank.body)
    doc = json.loads(_sm_bundle())
    assert doc["sections"][0]["signature"]["algorithm"] == "SM2-SM3"
    assert doc["sections"][0]["body"]["keys"][0] == {
        "algorithm": "SM4", "kcv": "9F1F7B", "kcv_method": "SM4-ECB-ZERO16-3", "name": "bank-k1", "usage": "u1",
        "wrap": "SM4-ECB", "wrapped": "000102030405060708090A0B0C0D0E0F"}


def test_the_section_builders_write_ecdsa_and_aes_kwp_by_default() -> None:
    # what every bundle before SM was: a builder not told otherwise writes exactly the old members
    body = bundle.section_body(_header("bank"), _keys("bank"))
    assert bundle.section(body, "K", SIG["bank"])["signature"]["algorithm"] == "ECDSA-P256-SHA256"
    assert all(k["wrap"] == "AES-KWP" for k in body["keys"])
    assert bundle.encode_signed_section(bundle.canonical(body), "K", SIG["bank"]) == bundle.encode_section(
        bundle.section(body, "K", SIG["bank"]))


def test_a_bundle_sealed_before_sm_parses_exactly_as_before() -> None:
    # docs/bundle-format.md's example, byte for byte as kms 0.1.0 sealed it before issue 14 (tests/fixtures)
    data = (FIXTURES / "bundle-before-sm.kmsb").read_bytes()
    parsed = bundle.parse(data)
    assert [s.domain for s in parsed.sections] == ["bank", "hrss"]
    assert {s.signature_algorithm for s in parsed.sections} == {"ECDSA-P256-SHA256"}
    assert {k.wrap for s in parsed.sections for k in s.keys} == {"AES-KWP"}
    assert {(k.algorithm, k.kcv_method) for s in parsed.sections for k in s.keys} == {("DES2", "TDES-ECB-ZERO8-3")}
    # re-encoding what was parsed gives the same bytes: nothing about an ECDSA/AES bundle changed
    assert bundle.assemble(parsed.serial, parsed.card_ref, {
        s.domain: bundle.encode_section(bundle.section(
            bundle.section_body(bundle.SectionHeader(
                serial=s.serial, domain=s.domain, bureau=s.bureau, batch=s.body["batch"], card_ref=s.card_ref,
                profile=s.body["profile"], created_at=s.body["created_at"], master_keys=s.body["master_keys"],
                transport_key=s.transport_key, transport_key_version=s.transport_key_version,
                transport_key_kcv=s.transport_key_kcv, domains=tuple(s.domains)), s.keys),
            s.key_id, s.signature))
        for s in parsed.sections}) == data


# -- SectionTemplate: the sealer's encoding, spliced ------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)  # any string JSON can carry, U+E000 too


@given(serial=_text, batch=_text, card_ref=_text, created_at=_text, domain=st.sampled_from(["bank", "hrss"]),
       keys=st.lists(st.tuples(st.binary(max_size=40), st.binary(min_size=3, max_size=3)), min_size=1, max_size=9),
       algorithm=st.sampled_from(bundle.SIGNATURE_ALGORITHMS), signature=st.binary(min_size=64, max_size=64))
def test_section_template_writes_the_canonical_encoding_of_the_whole_section(
        serial: str, batch: str, card_ref: str, created_at: str, domain: str, keys: list[tuple[bytes, bytes]],
        algorithm: str, signature: bytes) -> None:
    entries = [{"name": f"{domain}-k{i}", "usage": "u\"\\é", "algorithm": "DES2", "wrap": "AES-KWP",
                "kcv_method": "TDES-ECB-ZERO8-3"} for i in range(len(keys))]
    template = bundle.SectionTemplate(_header(domain).to_json(), entries, KEY_ID[domain], algorithm)
    body = template.body(serial, batch, card_ref, created_at, keys)
    expected = _header(domain).to_json()
    expected.update(serial=serial, batch=batch, card_ref=card_ref, created_at=created_at, keys=[
        {**entry, "wrapped": bundle.hexs(w), "kcv": bundle.hexs(k)}
        for entry, (w, k) in zip(entries, keys, strict=True)])
    assert body == bundle.canonical(expected)
    assert template.signed(body, signature) == bundle.encode_signed_section(
        bundle.canonical(expected), KEY_ID[domain], signature, algorithm)
    assert json.loads(template.signed(body, signature))["body"] == expected


def test_section_template_refuses_a_wrong_number_of_keys() -> None:
    entry = {"name": "k", "usage": "u", "algorithm": "DES2", "wrap": "AES-KWP", "kcv_method": "TDES-ECB-ZERO8-3"}
    header = _header("bank").to_json()
    template = bundle.SectionTemplate(header, [entry], KEY_ID["bank"], bundle.SIGNATURE_ALGORITHM)
    with pytest.raises(ValueError, match="1 keys, not 2"):
        template.body(SERIAL, "b", CARD_REF, "t", [(b"\x01", b"\x02" * 3)] * 2)


# -- review s22: SectionTemplate against the canonical encoder, header values and key entries varied too ---------------

_MARK = "\ue000"
_header_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # the slot marks too
_awkward = st.sampled_from(["", "\"", "\\", "\u2028", "\u2029", "\x00", "\x1f", "\x7f", "\U0001F511", "é", "\ufeff",
                            "serial", "wrapped", "kcv", "\"\\u00e9\"", "\\ue000serial\\ue000", "\"" + "x" * 3])
_header_value = st.one_of(_header_text, _awkward)
_card_value = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), _awkward,
                        st.sampled_from([_MARK, f"{_MARK}serial{_MARK}", f"{_MARK}kcv0{_MARK}", f"\"{_MARK}batch"]))
_entry_key = st.one_of(st.sampled_from(["name", "usage", "algorithm", "wrap", "kcv_method", "kcu", "kcv_", "kcw",
                                        "wrappe", "wrappedz", "wrapped0", "kcv0", "serial", "card_ref", "a", "z"]),
                       _header_text)


@given(bureau=_header_value, profile=_header_value, master_names=st.lists(_header_value, max_size=4),
       transport=_header_value, kcv=_header_value,
       entries=st.lists(st.dictionaries(_entry_key, _header_value, max_size=6), min_size=1, max_size=11),
       serial=_card_value, batch=_card_value, card_ref=_card_value, created_at=_card_value,
       data=st.data(), algorithm=st.sampled_from(bundle.SIGNATURE_ALGORITHMS),
       signature=st.binary(min_size=64, max_size=64))
def test_section_template_matches_the_canonical_encoder_whatever_the_header_and_entries_hold(
        bureau: str, profile: str, master_names: list[str], transport: str, kcv: str,
        entries: list[dict[str, str]], serial: str, batch: str, card_ref: str, created_at: str, data: st.DataObject,
        algorithm: str, signature: bytes) -> None:
    header = bundle.SectionHeader(
        serial="", domain="bank", bureau=bureau, batch="", card_ref="", profile=profile, created_at="",
        master_keys={name: i for i, name in enumerate(master_names)}, transport_key=transport,
        transport_key_version=1, transport_key_kcv=kcv, domains=("bank", "hrss")).to_json()
    entries = [{k: v for k, v in e.items() if k not in ("wrapped", "kcv")} for e in entries]
    keys = data.draw(st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=4)),
                              min_size=len(entries), max_size=len(entries)))
    template = bundle.SectionTemplate(header, entries, KEY_ID["bank"], algorithm)
    body = template.body(serial, batch, card_ref, created_at, keys)
    expected = dict(header, serial=serial, batch=batch, card_ref=card_ref, created_at=created_at, keys=[
        {**entry, "wrapped": bundle.hexs(w), "kcv": bundle.hexs(k)}
        for entry, (w, k) in zip(entries, keys, strict=True)])
    assert body == bundle.canonical(expected)
    signed = template.signed(body, signature)
    assert signed == bundle.encode_signed_section(body, KEY_ID["bank"], signature, algorithm)
    assert signed == bundle.canonical(bundle.section(expected, KEY_ID["bank"], signature, algorithm))
    # What is signed is what a reader parses back: the context string and exactly the section's body bytes.
    parsed = json.loads(signed)
    assert bundle.signed_bytes(parsed["body"]) == bundle.SIGNING_CONTEXT + body


@pytest.mark.parametrize("where", ["bureau", "profile", "master key name", "transport", "entry value", "entry key"])
def test_section_template_encodes_private_use_characters_anywhere_in_what_it_encodes_once(where: str) -> None:
    """A profile's usage is free text (GBK's user-defined characters map to U+E000 and on): a fixed value holding
    the template's slot mark, even a whole slot, is encoded as the canonical encoder does, not refused."""
    header = _header("bank").to_json()
    entry = {"name": "k", "usage": "u", "algorithm": "DES2", "wrap": "AES-KWP", "kcv_method": "TDES-ECB-ZERO8-3"}
    if where == "bureau":
        header["bureau"] = f"{_MARK}serial{_MARK}"
    elif where == "profile":
        header["profile"] = _MARK
    elif where == "master key name":
        header["master_keys"] = {f"{_MARK}batch{_MARK}": 1}
    elif where == "transport":
        header["transport_key"] = {**header["transport_key"], "name": f"{_MARK}kcv0{_MARK}"}
    elif where == "entry value":
        entry["name"] = f"{_MARK}wrapped0{_MARK}"
    else:
        entry[f"{_MARK}card_ref{_MARK}"] = "x"
    header["profile"] = f"{header['profile']}\ue001{_MARK}\ue002"  # the next marks too
    template = bundle.SectionTemplate(header, [entry], KEY_ID["bank"], bundle.SIGNATURE_ALGORITHM)
    body = template.body(f"{_MARK}serial{_MARK}", "b\ue001", CARD_REF, "t", [(b"\x01", b"\x02" * 3)])
    expected = dict(header, serial=f"{_MARK}serial{_MARK}", batch="b\ue001", card_ref=CARD_REF, created_at="t",
                    keys=[{**entry, "wrapped": "01", "kcv": "020202"}])
    assert body == bundle.canonical(expected)
    assert template.signed(body, bytes(64)) == bundle.canonical(
        bundle.section(expected, KEY_ID["bank"], bytes(64)))
