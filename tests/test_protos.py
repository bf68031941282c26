"""The generated kms.v1 code is current with protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    protos = sorted((ROOT / "protos" / "kms" / "v1").glob("*.proto"))
    assert protos
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *map(str, protos)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated
    for rel in generated:
        assert (ROOT / rel).read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale: run `make protos`"


def test_the_issuance_service_is_described() -> None:
    from kms.v1 import issuance_pb2

    service = issuance_pb2.DESCRIPTOR.services_by_name["IssuanceService"]
    assert [m.name for m in service.methods] == ["IssueCard", "StreamBatch", "GetBatchStatus"]
    assert service.methods_by_name["StreamBatch"].server_streaming
