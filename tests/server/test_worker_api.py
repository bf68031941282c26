"""The worker services' API without a worker: each named key operation's arguments and result cross it unchanged,
it covers exactly the steps a spawned worker runs, and what it refuses it refuses before any worker sees it
(kms.server.worker). The services themselves, end to end: tests/server/test_worker.py."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kms.canonical import canonical
from kms.ceremony import keyops
from kms.ceremony.rules import MINUTES_FORMAT
from kms.errors import InvalidArgument, InvalidState
from kms.issuance import pans
from kms.issuance.workers import WORKER_STEPS
from kms.server import worker
from kms.v1 import worker_pb2 as pb

#: A real station-sized RSA public key: the worker checks the SPKI before anything else.
RSA_SPKI = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
    Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

CAROL = "urn:kms:officer:bank:carol"
MINUTES = canonical({"format": MINUTES_FORMAT, "domain": "bank", "ceremony_id": "C-0123456789abcdef"})
KEY = {"label": "kms/bank/master/bank-mk/v2", "version": 2, "state": "active", "kcv": "ABCDEF",
       "kcv_method": "aes-ecb-zero", "escrow": "no"}

#: (operation, arguments as the front end passes them, a result as the worker returns it)
CASES: list[tuple[Any, tuple[Any, ...], Any]] = [
    (keyops.check_component, ("AES256", b"\x01" * 256, "ABCDEF"), None),
    (keyops.sign, ("kms/bank/signing/issuance/v1", MINUTES), b"\x02" * 64),
    (keyops.create_key, ("master", "bank-mk", "AES256", True, "ABCDEF", [(CAROL, b"\x03" * 256, "123456")], True),
     KEY),
    (keyops.create_key, ("transport", "bureau-a", "AES256", True, None, [], False), KEY),
    (keyops.export_components, ("master", "bank-mk", 2, [(CAROL, "-----BEGIN PUBLIC KEY-----")],
                                "C-0123456789abcdef"), [(CAROL, b"\x04" * 90, "654321")]),
    (keyops.transport_key_for_rsa, ("bureau-a", RSA_SPKI, "SM4"), (KEY, b"\x05" * 256)),
    (keyops.discard_key, ("transport", "bureau-a", 3), None),
    (keyops.destroy_key, ("master", "bank-mk", 1), KEY),
    (pans.protect_pans, ("B-1", [("card-1", "6214830000000000", "01")]), [(b"\x06" * 40, "ab" * 32, "cd" * 32)]),
    (keyops.generate_signing_key, ("issuance-sm2", "sm2"), {"label": "kms/bank/signing/issuance-sm2/v2", "version": 2,
                                                            "state": "pre-activation", "algorithm": "sm2",
                                                            "public_key": b"\x30" * 91}),
    (keyops.signature_algorithms, (), ["ecdsa-p256", "sm2"]),
]


def test_the_operations_are_exactly_the_steps_a_worker_runs() -> None:
    named = {f"{op.function.__module__}.{op.function.__qualname__}" for op in worker.OPERATIONS}
    assert named == WORKER_STEPS
    oneof = pb.KeyOperationRequest.DESCRIPTOR.oneofs_by_name["operation"]
    assert {op.field for op in worker.OPERATIONS} == {field.name for field in oneof.fields}


@pytest.mark.parametrize(("function", "arguments", "result"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_arguments_and_results_cross_unchanged(function: Any, arguments: tuple[Any, ...], result: Any) -> None:
    op = worker.operation_for(function)
    request = pb.KeyOperationRequest.FromString(pb.KeyOperationRequest(**{op.field: op.request(*arguments)})
                                                .SerializeToString())
    assert request.WhichOneof("operation") == op.field
    assert op.arguments(getattr(request, op.field), "bank") == arguments
    response = pb.KeyOperationResponse.FromString(op.result(result).SerializeToString())
    assert op.value(response) == result


def test_no_other_function_can_be_sent() -> None:
    for function in (print, eval, keyops.custody_label, pans.open_card):
        with pytest.raises(InvalidState, match="is not an operation a worker service runs"):
            worker.operation_for(function)


@pytest.mark.parametrize(("field", "message", "error"), [
    ("sign", pb.SignDocument(label="kms/hrss/signing/issuance/v1", message=MINUTES), "label: must be a bank signing"),
    ("sign", pb.SignDocument(label="kms/bank/signing/issuance/v1", message=b'{"format":"kms-bundle"}'),
     "message: is not the minutes of a bank ceremony"),
    ("sign", pb.SignDocument(label="kms/bank/signing/issuance/v1",
                             message=canonical({"format": MINUTES_FORMAT, "domain": "hrss"})),
     "message: is not the minutes of a bank ceremony"),
    ("create_key", pb.CreateKey(kind="signing", name="x", algorithm="AES256"), "kind: must be one of master, "),
    ("create_key", pb.CreateKey(kind="master", name="../x", algorithm="AES256"), "name: must be a name"),
    ("create_key", pb.CreateKey(kind="master", name="x", algorithm="RC4"), "algorithm: must be one of"),
    ("create_key", pb.CreateKey(kind="master", name="x", algorithm="AES256", expected_kcv="zz"), "expected_kcv: "),
    ("destroy_key", pb.KeyRef(kind="master", name="x", version=0), "version: must be a version from 1"),
    ("export_components", pb.ExportComponents(kind="master", name="x", version=1, ceremony_id="C-1"),
     "recipients: at least one is needed"),
    ("export_components", pb.ExportComponents(kind="master", name="x", version=1, ceremony_id="C-1", recipients=[
        pb.Recipient(uri=CAROL)]), "ceremony_id: "),
    ("check_component", pb.CheckComponent(algorithm="AES256", sealed=b"", kcv="ABCDEF"), "encrypted_component: "),
    ("generate_signing_key", pb.GenerateSigningKey(name="../issuance", algorithm="sm2"), "name: must be a name"),
    ("generate_signing_key", pb.GenerateSigningKey(name="issuance", algorithm="rsa"), "algorithm: must be one of "
                                                                                     "ecdsa-p256, sm2"),
    ("protect_pans", pb.ProtectPans(batch_id="B-1", items=[pb.PanItem(card_ref="c", pan="12ab", psn="01")]), "pan: "),
])
def test_bad_arguments_are_refused_naming_the_field(field: str, message: Any, error: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        worker.BY_FIELD[field].arguments(message, "bank")
    assert str(raised.value).startswith(error), raised.value
