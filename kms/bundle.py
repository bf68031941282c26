"""Sealed bundle format v1 (docs/bundle-format.md): encoding, sealing and strict parsing.

A bundle carries one card's keys to a personalization station: one section per domain, each section signed by its
own domain's issuance signing key, so no section ever depends on (or contains) the other domain's keys.

The encoding is canonical JSON: UTF-8, object keys sorted, no insignificant whitespace, only strings, integers,
lists and objects; binary values as upper-case hex. A reader re-encodes what it parsed and refuses any input that
is not byte-for-byte canonical, so every byte of a bundle is either signed or structurally fixed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kms.canonical import _dumps, canonical
from kms.errors import BundleRejected

BUNDLE_FORMAT = "kms-sealed-bundle"
SECTION_FORMAT = "kms-sealed-section"
VERSION = 1
SIGNATURE_ALGORITHM = "ECDSA-P256-SHA256"  # r ‖ s over SHA-256, curve P-256 (the default, and every bundle before SM)
SM2_SIGNATURE_ALGORITHM = "SM2-SM3"  # r ‖ s, SM2 with SM3 and the default Z_A identity of GM/T 0009
#: The section signature algorithms a reader accepts; the value is r ‖ s, 64 bytes, in both.
SIGNATURE_ALGORITHMS = (SIGNATURE_ALGORITHM, SM2_SIGNATURE_ALGORITHM)
WRAP_ALGORITHM = "AES-KWP"  # RFC 5649 AES key wrap with padding, under an AES-256 transport key
SM4_WRAP_ALGORITHM = "SM4-ECB"  # SM4-ECB of the key value (a multiple of 16 bytes, no padding), under an SM4 one
WRAP_ALGORITHMS = (WRAP_ALGORITHM, SM4_WRAP_ALGORITHM)
#: The wrap method of a section's keys, by the algorithm of the transport key they are wrapped under.
WRAP_BY_TRANSPORT = {"AES256": WRAP_ALGORITHM, "SM4": SM4_WRAP_ALGORITHM}
#: The KCV method of a card key, by its algorithm (what issuance writes and a station expects).
KCV_METHODS = {"DES2": "TDES-ECB-ZERO8-3", "SM4": "SM4-ECB-ZERO16-3"}
#: Signed bytes are this context string followed by the canonical section body (domain separation).
SIGNING_CONTEXT = b"kms-sealed-section/v1\x00"
MAX_BUNDLE_BYTES = 1 << 20

_HEX = re.compile(r"^(?:[0-9A-F]{2})*$")


def hexs(data: bytes) -> str:
    return data.hex().upper()


def key_id(spki_der: bytes) -> str:
    """A signing key's id: the first 16 bytes of SHA-256 over its SubjectPublicKeyInfo, in hex."""
    return hexs(hashlib.sha256(spki_der).digest()[:16])


@dataclass(frozen=True)
class SealedKey:
    name: str
    usage: str
    algorithm: str
    wrapped: bytes
    kcv: bytes
    kcv_method: str
    wrap: str = WRAP_ALGORITHM

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "usage": self.usage, "algorithm": self.algorithm, "wrap": self.wrap,
            "wrapped": hexs(self.wrapped), "kcv": hexs(self.kcv), "kcv_method": self.kcv_method,
        }


@dataclass(frozen=True)
class SectionHeader:
    serial: str  # the bundle's serial: 32 hex digits, unique per bundle, the same in every section
    domain: str
    bureau: str
    batch: str
    card_ref: str
    profile: str
    created_at: str
    master_keys: Mapping[str, int]  # master key name -> version used
    transport_key: str  # transport key name (the bureau)
    transport_key_version: int
    transport_key_kcv: str
    domains: tuple[str, ...]  # every domain with a section in this bundle (signed, so none can be dropped)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SECTION_FORMAT, "version": VERSION, "serial": self.serial, "domain": self.domain,
            "domains": list(self.domains),
            "bureau": self.bureau, "batch": self.batch, "card_ref": self.card_ref, "profile": self.profile,
            "created_at": self.created_at, "master_keys": dict(self.master_keys),
            "transport_key": {"name": self.transport_key, "version": self.transport_key_version,
                              "kcv": self.transport_key_kcv},
        }


def section_body(header: SectionHeader, keys: Sequence[SealedKey]) -> dict[str, Any]:
    body = header.to_json()
    body["keys"] = [k.to_json() for k in keys]
    return body


def signed_bytes(body: Mapping[str, Any]) -> bytes:
    """What a section's signature covers. ``body`` holds only str/int values: built by section_body, or parsed
    from a bundle whose canonical form was already checked."""
    return SIGNING_CONTEXT + _dumps(body)


def section(body: Mapping[str, Any], key_id: str, signature: bytes, algorithm: str = SIGNATURE_ALGORITHM
            ) -> dict[str, Any]:
    return {
        "body": dict(body),
        "signature": {"algorithm": algorithm, "key_id": key_id, "value": hexs(signature)},
    }


def encode_signed_section(body_bytes: bytes, key_id: str, signature: bytes, algorithm: str = SIGNATURE_ALGORITHM
                          ) -> bytes:
    """A section's canonical bytes from its body's canonical bytes (what was signed, minus the context string)
    and the signature (made with ``algorithm``): spliced, so the body is encoded once ("body" sorts before
    "signature")."""
    sig = _dumps({"algorithm": algorithm, "key_id": key_id, "value": hexs(signature)})
    return b'{"body":' + body_bytes + b',"signature":' + sig + b"}"


class SectionTemplate:
    """The canonical bytes of the sections one sealer writes, spliced into a template rather than encoded whole:
    everything but the serial, batch, card reference, time and each key's wrapped value and KCV is the same for
    every section of a sealer (its domain, bureau, profile, key versions and key entries), so it is encoded once.
    The result is byte for byte the canonical encoding of the same body (tests/test_bundle.py checks it on random
    values) and ``encode_signed_section`` of it.

    ``header``: the section header's JSON (``SectionHeader.to_json``, its per-card fields left anything);
    ``entries``: each key's fixed fields, in section order (``SealedKey.to_json`` without "wrapped" and "kcv")."""

    def __init__(self, header: Mapping[str, Any], entries: Sequence[Mapping[str, str]], key_id: str,
                 algorithm: str) -> None:
        names = ["serial", "batch", "card_ref", "created_at"]
        for i in range(len(entries)):
            names += [f"wrapped{i}", f"kcv{i}"]
        # A slot is marked with a private-use character that no fixed value holds (a profile's free-text usage may
        # hold U+E000, GBK's first user-defined character), so each slot is found exactly once.
        for code in range(0xE000, 0xF900):
            mark = chr(code)
            slots = {name: f"{mark}{name}{mark}" for name in names}
            body = dict(header)
            body.update({name: slots[name] for name in names[:4]})
            body["keys"] = [{**entry, "wrapped": slots[f"wrapped{i}"], "kcv": slots[f"kcv{i}"]}
                            for i, entry in enumerate(entries)]
            encoded = canonical(body)
            if encoded.count(mark.encode()) == 2 * len(names):
                break
        else:
            raise ValueError("the section header and key entries hold every private-use character U+E000-U+F8FF")
        found = sorted((encoded.index(_dumps(slot)), name) for name, slot in slots.items())
        parts, order, at = [], [], 0
        for start, name in found:
            parts.append(encoded[at:start])
            order.append(name)
            at = start + len(_dumps(slots[name]))
        parts.append(encoded[at:])
        self._parts = parts
        self._order = [names.index(name) for name in order]
        self._signature_head = (b',"signature":' + _dumps({"algorithm": algorithm, "key_id": key_id, "value": ""})
                                )[:-2]  # up to the value's opening quote

    def body(self, serial: str, batch: str, card_ref: str, created_at: str,
             keys: Sequence[tuple[bytes, bytes]]) -> bytes:
        """A section body's canonical bytes: ``keys`` holds each key's (wrapped value, KCV), in entry order."""
        values = [_string(serial), _string(batch), _string(card_ref), _string(created_at)]
        for wrapped, kcv in keys:
            values += [b'"' + hexs(wrapped).encode() + b'"', b'"' + hexs(kcv).encode() + b'"']
        if len(values) != len(self._order):
            raise ValueError(f"a section of this template has {(len(self._order) - 4) // 2} keys, not {len(keys)}")
        parts = self._parts
        out = [parts[0]]
        for i, slot in enumerate(self._order):
            out += (values[slot], parts[i + 1])
        return b"".join(out)

    def signed(self, body: bytes, signature: bytes) -> bytes:
        """``encode_signed_section(body, key_id, signature, algorithm)``."""
        return b'{"body":' + body + self._signature_head + hexs(signature).encode() + b'"}}'


def _string(value: str) -> bytes:
    """A JSON string's canonical bytes (as the canonical encoder writes a string inside an object)."""
    return _STRING(value).encode("utf-8")


_STRING = json.JSONEncoder(ensure_ascii=False).encode


def encode_section(section_doc: Mapping[str, Any]) -> bytes:
    """Canonical bytes of a section built by kms.bundle (its values are str/int by construction)."""
    return _dumps(section_doc)


def assemble(serial: str, card_ref: str, sections: Mapping[str, bytes]) -> bytes:
    """The bundle file: an envelope around the signed sections (canonical bytes by domain), ordered by domain.

    The sections arrive already canonical from each domain's worker; the envelope is spliced around them, which
    gives the same bytes as encoding the whole document (keys sorted: card_ref, format, sections, serial, version).
    """
    head = canonical({"card_ref": card_ref, "format": BUNDLE_FORMAT})[:-1]
    tail = canonical({"serial": serial, "version": VERSION})[1:]
    parts = b",".join(sections[d] for d in sorted(sections))
    return head + b',"sections":[' + parts + b"]," + tail


# -- reading ------------------------------------------------------------------------------------------------------


#: A key as read from a bundle: the same fields a sealer writes.
ParsedKey = SealedKey


@dataclass(frozen=True)
class ParsedSection:
    body: dict[str, Any]
    domain: str
    bureau: str
    serial: str
    card_ref: str
    transport_key: str
    transport_key_version: int
    transport_key_kcv: str
    domains: list[str]
    key_id: str
    signature: bytes
    keys: tuple[ParsedKey, ...]
    #: the body's canonical bytes, as read (the bundle's canonical form was checked with them)
    body_bytes: bytes
    #: "ECDSA-P256-SHA256" or "SM2-SM3" (SIGNATURE_ALGORITHMS)
    signature_algorithm: str = SIGNATURE_ALGORITHM

    @property
    def signed_bytes(self) -> bytes:
        return SIGNING_CONTEXT + self.body_bytes


@dataclass(frozen=True)
class ParsedBundle:
    serial: str
    card_ref: str
    sections: tuple[ParsedSection, ...]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The JSON object hook of ``parse``: refuses a repeated key, and true/false/null values (canonical JSON here
    holds only strings, integers, lists and objects; floats and constants are refused by the parser's hooks and
    every object is checked by this hook as it is read, so no second walk of the document is needed)."""
    result: dict[str, Any] = {}
    for k, v in pairs:
        if k in result:
            raise ValueError("duplicate key")
        if v is None or v is True or v is False or (isinstance(v, list) and not _plain(v)):
            raise ValueError("only str, int, list and object values")
        result[k] = v
    return result


def _plain(value: Any) -> bool:
    """Not true/false/null, nor a list holding one (its objects were checked by the hook already)."""
    if value is None or value is True or value is False:
        return False
    return not isinstance(value, list) or all(_plain(v) for v in value)


def _reject_constant(_: str) -> Any:
    raise ValueError("non-finite number")


def parse(data: bytes) -> ParsedBundle:
    """Parse a bundle strictly: canonical bytes, exact fields, known format and version. Any deviation raises
    the one opaque BundleRejected; the signature is checked by the station (kms.station)."""
    try:
        return _parse(data)
    except BundleRejected:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError, RecursionError):
        raise BundleRejected() from None


def _parse(data: bytes) -> ParsedBundle:
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError("too large")
    doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_float=_reject_constant,
                     parse_constant=_reject_constant)
    _fields(doc, {"format", "version", "serial", "card_ref", "sections"})
    if doc["format"] != BUNDLE_FORMAT or doc["version"] != VERSION:
        raise ValueError("unknown format")
    sections = tuple(_section(s) for s in _list(doc["sections"]))
    domains = [s.domain for s in sections]
    if not sections or len(set(domains)) != len(domains) or domains != sorted(domains):
        raise ValueError("sections")
    serial, card_ref = _str(doc["serial"]), _str(doc["card_ref"])
    for s in sections:
        if s.serial != serial or s.card_ref != card_ref:
            raise ValueError("envelope does not match its sections")
    # Canonical form: the document's canonical encoding, spliced as a sealer splices it (every field's value and
    # place is fixed by the checks above; each body is encoded once, and those bytes are what the signature
    # covers), must be the input byte for byte.
    canonical_form = assemble(serial, card_ref, {
        s.domain: encode_signed_section(s.body_bytes, s.key_id, s.signature, s.signature_algorithm)
        for s in sections})
    if canonical_form != data:
        raise ValueError("not canonical")
    return ParsedBundle(serial=serial, card_ref=card_ref, sections=sections)


def _section(doc: Any) -> ParsedSection:
    _fields(doc, {"body", "signature"})
    body, sig = doc["body"], doc["signature"]
    _fields(body, {"format", "version", "serial", "domain", "domains", "bureau", "batch", "card_ref", "profile",
                   "created_at", "master_keys", "transport_key", "keys"})
    _fields(sig, {"algorithm", "key_id", "value"})
    if (body["format"] != SECTION_FORMAT or body["version"] != VERSION
            or sig["algorithm"] not in SIGNATURE_ALGORITHMS):
        raise ValueError("unknown section format")
    tk = body["transport_key"]
    _fields(tk, {"name", "version", "kcv"})
    if not isinstance(body["master_keys"], dict):
        raise ValueError("master_keys")
    domains = [_str(d) for d in _list(body["domains"])]
    if domains != sorted(set(domains)) or body["domain"] not in domains:
        raise ValueError("domains")
    keys = tuple(_key(k) for k in _list(body["keys"]))
    if not keys:
        raise ValueError("no keys")
    if len({k.wrap for k in keys}) != 1:  # one transport key per section, so one wrap method
        raise ValueError("wrap")
    signature = _hex(sig["value"])
    if len(signature) != 64:
        raise ValueError("signature length")
    return ParsedSection(
        body=body, domain=_str(body["domain"]), bureau=_str(body["bureau"]), serial=_str(body["serial"]),
        card_ref=_str(body["card_ref"]), transport_key=_str(tk["name"]), transport_key_version=_int(tk["version"]),
        transport_key_kcv=_str(tk["kcv"]), domains=domains, key_id=_str(sig["key_id"]), signature=signature,
        keys=keys, body_bytes=_dumps(body), signature_algorithm=sig["algorithm"],
    )


def _key(doc: Any) -> ParsedKey:
    _fields(doc, {"name", "usage", "algorithm", "wrap", "wrapped", "kcv", "kcv_method"})
    if doc["wrap"] not in WRAP_ALGORITHMS:
        raise ValueError("wrap")
    return ParsedKey(
        name=_str(doc["name"]), usage=_str(doc["usage"]), algorithm=_str(doc["algorithm"]),
        wrapped=_hex(doc["wrapped"]), kcv=_hex(doc["kcv"]), kcv_method=_str(doc["kcv_method"]), wrap=doc["wrap"],
    )


def _fields(doc: Any, expected: set[str]) -> None:
    if not isinstance(doc, dict) or set(doc) != expected:
        raise ValueError("fields")


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("list")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("str")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("int")
    return value


def _hex(value: Any) -> bytes:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise ValueError("hex")
    return bytes.fromhex(value)
