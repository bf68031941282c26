"""Fuzzing every RPC of every kms service over the real mutual-TLS server (docs/issuance-service.md, section 5).

The RPCs come from the protobuf descriptors of every module in kms.v1, so a new RPC is fuzzed without a change
here; each is called as a principal its policy entry allows (kms/policies/authz.yaml), at least PER_RPC times, with
requests generated from the message descriptors by a seeded generator: raw random bytes, corrupted wire data
(bad UTF-8, wrong wire types, overlong lengths and varints, deep groups), and well-typed messages whose fields
hold nasty values (huge strings, Unicode digits, trailing newlines, out-of-range integers, malformed times, deeply
nested or non-canonical JSON for params_json) mixed with real ids (a batch, its cards, an open ceremony) so that
requests reach past the first check. No request may end INTERNAL or UNKNOWN, and the server must be healthy after.

Run with ``-s`` to see the totals; ``KMS_FUZZ_SEED`` and ``KMS_FUZZ_PER_RPC`` change the seed and the count.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import importlib
import json
import os
import pkgutil
import random
import secrets
import string
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import MASTER_KEYS, card, open_batch, service_client

import kms.v1
from kms.ceremony import components
from kms.ceremony.operations import OPERATIONS
from kms.client.ceremony import CeremonyClient
from kms.client.service import Client
from kms.clock import rfc3339
from kms.dev.home import AUDITORS, OFFICERS, Home
from kms.errors import KmsError
from kms.hsm.types import Algorithm
from kms.identity import Principal
from kms.server.authz import Policy
from kms.server.frame import MALFORMED
from kms.server.serve import Service

SEED = int(os.environ.get("KMS_FUZZ_SEED", "20260522"))
PER_RPC = int(os.environ.get("KMS_FUZZ_PER_RPC", "300"))
STREAM_MESSAGES = 2  # a server stream is read this far, then cancelled (an export of a large log is long)
CALL_TIMEOUT = 60.0
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

OFFICER_PRINCIPALS = [Principal("officer", name, domain=d) for d, names in OFFICERS.items() for name in names]
STATIONS = ["station-a1", "station-b1"]
AUDITOR = Principal("auditor", AUDITORS[0])


def kms_methods() -> list[tuple[str, MethodDescriptor]]:
    """Every RPC of every service in the kms.v1 protobuf package: (full method path, descriptor); not the worker
    services' internal API (worker.proto), which this server does not serve (tests/server/test_worker.py)."""
    found = []
    for module_info in pkgutil.iter_modules(kms.v1.__path__):
        if not module_info.name.endswith("_pb2") or module_info.name == "worker_pb2":
            continue
        module = importlib.import_module(f"kms.v1.{module_info.name}")
        for service_descriptor in module.DESCRIPTOR.services_by_name.values():
            for method in service_descriptor.methods:
                found.append((f"/{service_descriptor.full_name}/{method.name}", method))
    return sorted(found, key=lambda m: (m[0].endswith("/Cancel"), m[0]))  # Cancel last: it closes the ceremony


# -- request generation ------------------------------------------------------------------------------------------


def wide(digits: str) -> str:
    """The digits in full width (U+FF10...): str.isdigit() takes them, int() reads them, a regex's \\d matches."""
    return "".join(chr(0xFF10 + int(d)) for d in digits)


def arabic(digits: str) -> str:
    """The digits in Arabic-Indic (U+0660...)."""
    return "".join(chr(0x0660 + int(d)) for d in digits)


NASTY = [
    "", " ", "\n", "a\n", "\x00", "\t", "\r\n", "²", arabic("3"), wide("123"), "12²", "³1", "-1", "0", "1", "007", "+1",
    "99999999999999999999", "1e308", "NaN", "Infinity", "null", "true", "[]", "{}", "ﬀ", "ﬀ1234", "\u202e",
    "\ufeff", "😀", "é", "İ", "../../etc/passwd", "%s%s%n", "' OR 1=1 --", "<script>", "\\", '"', "*", "%", "_",
    "C-0123456789abcdef\n", "C-0123456789ABCDEF", "hrss\n", "HRSS", "bank ", "station-a1\n", "bureau-a\n",
    "urn:kms:officer:hrss:alice", "-" * 65, "a" * 64, "a" * 65,
]
TIMES = [
    "9999-12-31T23:59:59.5Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+00:01",
    "0001-01-01T00:00:00Z", "0000-00-00T00:00:00Z", "2024-02-30T00:00:00Z", "2024-13-01T00:00:00Z",
    "2024-01-01T24:00:00Z", "2024-01-01T00:00:60Z", "2024-01-01T00:00:00+99:99", "2024-01-01T00:00:00.9999999999Z",
    wide("2024") + "-01-01T00:00:00Z", "2024-01-01", "2024-01-01T00:00:00", "2024-01-01t00:00:00z",
    "2024-01-01 00:00:00Z", "2024-01-01T00:00:00Z\n", "now", "1700000000", "-2024-01-01T00:00:00Z",
    "2026-01-01T00:00:00Z",
]
UINT32 = [0, 1, 2, 3, 255, 256, 257, 2**31 - 1, 2**31, 2**32 - 1]
UINT64 = [*UINT32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
ALPHABETS = [string.printable, string.ascii_lowercase + string.digits + "-._:", "0123456789ABCDEF",
             "²³¹" + arabic("0123456789") + wide("0123456789") + "\u07c0\u0966",  # digits str.isdigit() takes
             "".join(chr(c) for c in range(0x80, 0x800)),
             "ﬀﬁﬂß" + "\u0301\u200b\u2028\u2029\ufeff\U0001f600"]
PARAM_KEYS = ["name", "version", "kind", "state", "algorithm", "escrow", "kcv", "custodians", "recipients",
              "bureau", "station", "method", "public_key", "batch_id", "roles", "certificate", "cert_sha256",
              "custody_key", "profile", "card_count", "cards_digest", "master_keys", "replaces_version"]
INT_VALUES = [0, -1, 1, 2, 2**31 - 1, 2**31, 2**32, 2**63, 99999999999999999999, -(2**63) - 1]


@dataclass
class Known:
    """Real ids of this server, so that some requests get past the first check."""

    batch_id: str
    card_refs: list[str]
    ceremony_id: str  # an open hrss import-master-key ceremony; custodians bob and chen
    component: bytes  # an AES-256 component sealed to the hrss custody key
    component_kcv: str


def text(rng: random.Random) -> str:
    size = rng.choice([0, 1, 2, 8, 16, 20, 64, 65, 200, 1000, 4096]) if rng.random() < 0.97 else rng.choice(
        [65_537, 300_000])
    alphabet = rng.choice(ALPHABETS)
    return "".join(rng.choice(alphabet) for _ in range(min(size, 4096))) * max(1, size // 4096)


def blob(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 16, 64, 70, 72, 383, 384, 385, 512, 2048, 2049, 70_000])
    fill = rng.random()
    if fill < 0.1:
        return b"\xff" * size  # as a number, not below any modulus
    if fill < 0.2:
        return bytes(size)
    return rng.randbytes(size)


def params_json(rng: random.Random, good: bool = False) -> str:
    """Parameters: with ``good`` a JSON object with parameter names and (mostly odd) values, else anything from
    100,000 levels deep to not JSON at all."""
    pick = rng.randrange(8, 14) if good else rng.randrange(14)
    if pick == 0:
        depth = rng.choice([100_000, 20_000])
        return "[" * depth + "]" * depth
    if pick == 1:
        depth = rng.choice([9, 50, 1000, 10_000])
        return '{"a":' * depth + "1" + "}" * depth
    if pick == 2:
        return rng.choice(["[]", "1", '"x"', "null", "true", "1.5", "[{}]", '""'])
    if pick == 3:
        return rng.choice(['{"version":NaN}', '{"version":Infinity}', '{"version":-Infinity}', '{"version":1.5}',
                           '{"version":1e400}', '{"version":-0.0}', '{"version":1E2}'])
    if pick == 4:
        return '{"version":' + rng.choice(["9" * 20, "9" * 65, "9" * 5000, "-" + "9" * 30]) + "}"
    if pick == 5:
        return rng.choice(["{", "{'a':1}", '{"a":1,}', '{"a" 1}', "{\"a\":\"\x00\"}", text(rng)])
    if pick == 6:
        return rng.choice(['{"name":"\\ud800"}', '{"name":"\\udfff\\ud800"}', '{"\\ud83d":1}'])
    if pick == 7:
        return '{"name":"a","name":"b"}'
    if pick == 8:
        return json.dumps({"name": rng.choice(list(_master_key_names())), "version": rng.choice(INT_VALUES),
                           "state": rng.choice(["suspended", "active", "compromised", "deactivated"]),
                           "kind": rng.choice(["master", "transport", "x"])})
    return json.dumps({k: param_value(rng, 0) for k in rng.sample(PARAM_KEYS, rng.randrange(0, 6))})


def templates(rng: random.Random, known: Known) -> dict[str, dict[str, Any]]:
    """Parameters each operation takes (docs/ceremonies.md), with values that pass or nearly pass its check."""
    master = sorted(name for domain, name in MASTER_KEYS if domain == "hrss")[0]
    return {
        "generate-master-key": {"name": "fuzz-gen", "algorithm": "AES256", "escrow": "no"},
        "rotate-master-key": {"name": master},
        "import-master-key": {"name": "fuzz-imp", "kcv": "000000", "custodians": ["bob", "chen"]},
        "export-master-key": {"name": master, "version": 1, "recipients": ["bob", "chen"]},
        "set-key-state": {"name": master, "version": rng.choice([1, 99999999999999999999]), "state": "suspended"},
        "destroy-key": {"name": master, "version": 2**31, "kind": "master"},
        "authorize-batch": {"batch_id": known.batch_id, "card_count": 3},
        "enrol-officer": {"name": "eve\n", "roles": ["approver"], "public_key": "", "certificate": ""},
        "revoke-officer": {"name": "bob\n"},
        "register-transport-key": {"bureau": "bureau-a", "method": "import-components", "kcv": "000000",
                                   "custodians": ["bob", "chen"]},
    }


def operation_params(rng: random.Random, operation: str, known: Known) -> str:
    """The operation's own parameters, one of them replaced by an odd value (or one added or left out)."""
    params = dict(templates(rng, known).get(operation, {"name": "fuzz"}))
    pick = rng.randrange(4)
    if pick == 0 and params:
        params.pop(rng.choice(sorted(params)))
    elif pick == 1:
        params[rng.choice(PARAM_KEYS)] = param_value(rng, 0)
    elif pick == 2 and params:
        params[rng.choice(sorted(params))] = param_value(rng, 0)
    return json.dumps(params)


def _master_key_names() -> set[str]:
    return {name for _, name in MASTER_KEYS}


def param_value(rng: random.Random, depth: int) -> Any:
    pick = rng.randrange(10)
    if pick < 3:
        return rng.choice(INT_VALUES)
    if pick < 6 or depth > 2:
        return rng.choice([*NASTY, *_master_key_names(), "alice", "bob", "chen", "yes", "no", "AES256", "DES2",
                           "SM4", "rsa-oaep", "import-components", "export-components", "bureau-a", "000000"])
    if pick < 8:
        return [param_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick < 9:
        return {rng.choice(PARAM_KEYS): param_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return rng.choice([True, False, None])


def string_value(rng: random.Random, field: FieldDescriptor, known: Known, good: bool) -> str:
    """A value for a string field: with ``good``, one that passes the field's own check (as far as the fuzzer
    knows), so that another field's nasty value is what the server must deal with; else mostly nasty."""
    if not good:
        roll = rng.random()
        if roll < 0.35:
            return rng.choice(NASTY)
        if roll < 0.5:
            return text(rng)
    name = "card_ref" if field.name.endswith("card_ref") else field.name
    pools: dict[str, Callable[[], list[str]]] = {
        "batch_id": lambda: [known.batch_id, f"B-{secrets.token_hex(4)}", known.batch_id + "\n"],
        "card_ref": lambda: [*known.card_refs, "card-zz", known.card_refs[0] + "\n"],
        "ceremony_id": lambda: [known.ceremony_id, f"C-{rng.randbytes(8).hex()}", known.ceremony_id + "\n",
                                known.ceremony_id.upper()],
        "operation": lambda: [*OPERATIONS, "generate-master-key\n"],
        "params_json": lambda: [params_json(rng, good)],
        "domain": lambda: ["hrss", "bank", "hrss\n", "Hrss", "other"],
        "application": lambda: ["hrss", "bank", "both"],
        "kind": lambda: ["cancel-card", "close-account", "ceremony", "request.ok", "fuzz.none", "a..b", "%"],
        "state": lambda: ["open", "executed", "failed", "cancelled", "expired", "executing", "OPEN"],
        "kcv": lambda: ["000000", known.component_kcv, known.component_kcv.lower(), " 0A1B2C ", "ﬀ1234", "0A1B2",
                        "0A1B2C3"],
        "cursor": lambda: ["0", "1", "3", "²", arabic("3"), "999999999", "1234567890", "-1", "0x1", " 1"],
        "since": lambda: ["", "2026-01-01T00:00:00Z", *TIMES],
        "until": lambda: ["", "9999-12-31T23:59:59Z", *TIMES],
        "nonce": lambda: [secrets.token_hex(16), secrets.token_hex(16).upper(), "00" * 15, "ﬀ" * 32,
                          secrets.token_hex(65)],
        "bureau": lambda: ["bureau-a", "bureau-b", "bureau-z", "bureau-a\n"],
        "profile": lambda: ["dual-app-v1", "dual-app-v1\n", "none"],
        "city_code": lambda: ["320200", wide("320200"), "32020²", "32020"],
        "card_serial": lambda: [f"{rng.randrange(2**64):016X}", "ﬀ843202AD932A48", "86843202ad932a48", "8684"],
        "kdd": lambda: [f"{rng.randrange(2**80):020X}", "ﬀ010203040506070809", "0001020304050607080"],
        "pan": lambda: [f"62148{rng.randrange(10**14):014d}", wide("621483000000"), "6214830000000000000999"],
        "psn": lambda: ["01", arabic("01"), "1"],
        "idempotency_key": lambda: [secrets.token_hex(8), "k 1", "k\n", "x" * 129, "é"],
        "reason": lambda: ["fuzz", "", "\n"],
    }
    pool = pools.get(name, lambda: ["x", *NASTY])()
    # Good: the first entry mostly (the one that passes), else any of the field's own edge cases.
    return pool[0] if good and rng.random() < 0.7 else rng.choice(pool)


def field_value(rng: random.Random, field: FieldDescriptor, known: Known, good: bool, depth: int) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return string_value(rng, field, known, good)
    if kind == FieldDescriptor.TYPE_BYTES:
        if not good or rng.random() < 0.3:
            return blob(rng)
        if field.name == "encrypted_component":  # decrypts (then its KCV is checked), or does not
            return rng.choice([known.component, bytes(1) + rng.randbytes(383), rng.randbytes(384)])
        return rng.randbytes(rng.choice([70, 71, 72]))  # as long as a DER ECDSA P-256 signature
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rng.randrange(4) if good else rng.choice(UINT32) if rng.random() < 0.8 else rng.randrange(2**32)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rng.randrange(4) if good else rng.choice(UINT64) if rng.random() < 0.8 else rng.randrange(2**64)
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return rng.choice([0, -1, 1, -(2**31), 2**31 - 1])
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return rng.choice([0, -1, 1, -(2**63), 2**63 - 1])
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return message(rng, field.message_type, known, good, depth + 1)
    raise AssertionError(f"no generator for {field.full_name} (type {kind})")


def message(rng: random.Random, descriptor: Descriptor, known: Known, good: bool, depth: int = 0) -> Any:
    """A well-typed message. ``good``: every field as it should be but one, which gets a nasty value (so requests
    get past the first checks); else random fields set, mostly to nasty values."""
    result = message_factory.GetMessageClass(descriptor)()
    fields = list(descriptor.fields)
    odd = rng.choice(fields) if good and fields and depth == 0 else None
    if good and {"operation", "params_json"} <= {f.name for f in fields}:  # parameters that fit the operation
        fields = [f for f in fields if f.name != "params_json"]
        if odd is None or odd.name != "params_json":
            operation = rng.choice(sorted(OPERATIONS)) if odd is None or odd.name != "operation" else ""
            result.operation = operation
            result.params_json = operation_params(rng, operation, known)
            fields = [f for f in fields if f.name != "operation"]
    for field in fields:
        valid = good and field is not odd
        if (not valid and rng.random() < 0.25) or depth > 3:
            continue
        if field.is_repeated:
            count = (rng.choice([1, 2, 3]) if valid else rng.choice([0, 1, 2, 3, 40])) if depth == 0 else 1
            values = [field_value(rng, field, known, valid, depth) for _ in range(count)]
            target = getattr(result, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for value in values:
                    target.add().CopyFrom(value)
            else:
                target.extend(values)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(result, field.name).CopyFrom(field_value(rng, field, known, valid, depth))
        else:
            setattr(result, field.name, field_value(rng, field, known, valid, depth))
    return result


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def corrupt(rng: random.Random, descriptor: Descriptor, data: bytes) -> bytes:
    """Wire data a parser must refuse or take apart carefully."""
    fields = list(descriptor.fields) or [None]
    field = rng.choice(fields)
    number = field.number if field is not None else rng.randrange(1, 20)
    pick = rng.randrange(10)
    if pick == 0:
        return rng.randbytes(rng.choice([1, 2, 3, 7, 64, 1000]))
    if pick == 1 and data:
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return bytes(flipped)
    if pick == 2 and len(data) > 1:
        return data[:rng.randrange(1, len(data))]
    if pick == 3:  # a string field that is not UTF-8
        bad = rng.choice([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"a\x80", b"\xf4\x90\x80\x80"])
        return data + _key(number, 2) + _varint(len(bad)) + bad
    if pick == 4:  # a known field with another wire type
        return data + _key(number, rng.choice([0, 1, 5])) + rng.choice([b"\x01", b"\x00" * 8, b"\x00" * 4])
    if pick == 5:  # a length far beyond the data
        return data + _key(number, 2) + _varint(rng.choice([2**31, 2**32 + 5, 1000])) + b"abc"
    if pick == 6:  # groups nested far deeper than any parser allows
        return _key(number, 3) * rng.choice([101, 1000, 20_000])
    if pick == 7:  # an overlong varint
        return data + _key(number, 0) + b"\xff" * rng.choice([10, 11, 20])
    if pick == 8:  # field numbers no message has: 0, 19000 (reserved), the largest
        return data + _key(rng.choice([0, 19_000, 2**29 - 1]), 0) + b"\x01"
    return data + _key(number, 4)  # an end-group with no start


def requests_for(rng: random.Random, method: MethodDescriptor, known: Known, count: int) -> Iterator[bytes]:
    for _ in range(count):
        roll = rng.random()
        built = message(rng, method.input_type, known, roll >= 0.6).SerializeToString()
        if roll < 0.1:
            yield rng.randbytes(rng.choice([0, 1, 5, 33, 300, 5000]))
        elif roll < 0.3:
            yield corrupt(rng, method.input_type, built)
        else:
            yield built  # 30 % random fields, 40 % all fields good but one


# -- calling -------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    method: str
    code: grpc.StatusCode
    details: str
    request: bytes


def call(channel: grpc.Channel, path: str, method: MethodDescriptor, request: bytes) -> Outcome:
    """One raw call (identity serializers: the bytes go as they are); a server stream is read STREAM_MESSAGES
    far and then cancelled (counted OK: the server had accepted the request)."""
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path)(request, timeout=CALL_TIMEOUT)
            for index, _ in enumerate(stream):
                if index + 1 >= STREAM_MESSAGES:
                    stream.cancel()
                    break
        else:
            channel.unary_unary(path)(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.CANCELLED and method.server_streaming:
            return Outcome(path, grpc.StatusCode.OK, "stream cancelled by the fuzzer", request)
        return Outcome(path, code, error.details() or "", request)
    return Outcome(path, grpc.StatusCode.OK, "", request)


@pytest.fixture(scope="module")
def known(home: Home, service: Service) -> Known:
    refs = [f"fuzz-{secrets.token_hex(3)}-{i}" for i in range(3)]
    batch_id = f"B-fuzz-{secrets.token_hex(4)}"
    base = 900_000 + secrets.randbelow(90_000) * 3
    with service_client(home, service, OFFICER_PRINCIPALS[0]) as alice:
        open_batch(home, service.port, alice, batch_id, "bureau-a", "dual-app-v1",
                   [card(base + i, card_ref=ref) for i, ref in enumerate(refs)])
        ceremony = CeremonyClient(alice).propose("import-master-key", {
            "name": f"fuzz-{secrets.token_hex(4)}", "algorithm": "AES256", "kcv": "000000",
            "custodians": ["bob", "chen"]})
        custody = CeremonyClient(alice).domain().custody_public_key
    part = secrets.token_bytes(32)
    return Known(batch_id, refs, ceremony.ceremony_id, components.seal_to_custody(custody, part),
                 components.kcv(Algorithm.AES256, part))


def test_no_malformed_request_ends_internal_or_unknown(home: Home, service: Service, known: Known) -> None:
    policy = Policy.load()
    methods = kms_methods()
    assert {p.split("/")[1] for p, _ in methods} >= {"kms.v1.IssuanceService", "kms.v1.BatchService",
                                                    "kms.v1.CardService", "kms.v1.CeremonyService",
                                                    "kms.v1.AuditService"}
    clients: dict[str, list[Client]] = {
        "officer": [service_client(home, service, p) for p in OFFICER_PRINCIPALS],
        "station": [service_client(home, service, s) for s in STATIONS],
        "auditor": [service_client(home, service, AUDITOR)],
    }
    rng = random.Random(SEED)
    outcomes: list[Outcome] = []
    fuzz_began = rfc3339(dt.datetime.now(dt.UTC).replace(microsecond=0))
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for path, method in methods:
                roles = sorted(policy.methods[path])  # every kms method has an entry (tests/test_authz.py)
                jobs = []
                for i, request in enumerate(requests_for(rng, method, known, PER_RPC)):
                    callers = clients[roles[i % len(roles)]]
                    # Mostly the hrss officers and bureau-a's station: the known ceremony's and batch's own.
                    channel = callers[rng.randrange(min(3, len(callers)) if rng.random() < 0.7 else len(callers))
                                      ].channel
                    jobs.append(pool.submit(call, channel, path, method, request))
                outcomes.extend(job.result() for job in jobs)  # one RPC at a time: Cancel runs last
        elapsed = time.monotonic() - started

        # The server is healthy, and a normal call still succeeds, for every role.
        for role, callers in clients.items():
            reply = health_pb2_grpc.HealthStub(callers[0].channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, role
        assert clients["station"][0].batch_status(known.batch_id).cards == 3
        assert clients["auditor"][0].batch_status(known.batch_id).batch_id == known.batch_id
        assert CeremonyClient(clients["officer"][1]).get(known.ceremony_id).ceremony_id == known.ceremony_id
    finally:
        # Proposals the fuzzer made that passed their checks are cancelled, so no other test meets them.
        for officer_client in clients["officer"]:
            officers = CeremonyClient(officer_client)
            for ceremony in officers.list("open"):
                if ceremony.created_at >= fuzz_began and ceremony.proposer in {p.uri() for p in OFFICER_PRINCIPALS}:
                    with contextlib.suppress(KmsError):  # another officer of the domain cancelled it first
                        officers.cancel(ceremony.ceremony_id)
        for callers in clients.values():
            for client in callers:
                client.close()

    per_method: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        per_method[outcome.method][outcome.code.name] += 1
    totals = collections.Counter(outcome.code.name for outcome in outcomes)
    print(f"\nfuzz: seed {SEED}, {len(outcomes)} requests to {len(methods)} RPCs in {elapsed:.1f} s")
    for path, counts in sorted(per_method.items()):
        print(f"  {path:55} {sum(counts.values()):5}  " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())))
    print("  totals: " + ", ".join(f"{c} {n}" for c, n in sorted(totals.items())))
    fields = collections.Counter(o.details.partition(":")[0] for o in outcomes
                                 if o.code == grpc.StatusCode.INVALID_ARGUMENT)
    print("  INVALID_ARGUMENT by field: " + ", ".join(f"{f} {n}" for f, n in fields.most_common()))
    if os.environ.get("KMS_FUZZ_DETAILS"):
        for (method, code, detail), n in collections.Counter(
                (o.method, o.code.name, o.details[:100]) for o in outcomes).most_common():
            print(f"    {n:4} {method} {code} {detail}")

    assert all(sum(counts.values()) >= PER_RPC for counts in per_method.values())
    assert set(per_method) == {p for p, _ in methods}
    bad = [o for o in outcomes if o.code in FORBIDDEN]
    assert not bad, "\n".join(f"{o.method} {o.code.name} {o.details!r} request={o.request[:120]!r}"
                              for o in bad[:20])
    # The generator reaches past parsing: every RPC's handler saw requests, and some calls succeed.
    assert {o.method for o in outcomes if o.details != MALFORMED} == set(per_method)
    assert totals["OK"] > 0 and totals["INVALID_ARGUMENT"] > fields[MALFORMED.partition(":")[0]]
