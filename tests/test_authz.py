"""The authorization policy: default deny, every kms method covered, readable refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.authz import Policy
from kms.errors import ConfigError, PermissionDenied
from kms.identity import Principal

STATION = Principal("station", "station-a1", bureau="bureau-a")
OFFICER = Principal("officer", "alice", domain="hrss")
AUDITOR = Principal("auditor", "carol")


def _all_kms_methods() -> list[str]:
    from kms.v1 import issuance_pb2

    return [f"/{service.full_name}/{method.name}"
            for service in issuance_pb2.DESCRIPTOR.services_by_name.values() for method in service.methods]


def test_every_method_of_every_kms_service_has_a_policy_entry() -> None:
    methods = _all_kms_methods()
    assert "/kms.v1.IssuanceService/IssueCard" in methods
    assert Policy.load().missing(methods) == []


def test_roles_and_default_deny() -> None:
    policy = Policy.load()
    policy.check(STATION, "/kms.v1.IssuanceService/IssueCard")
    with pytest.raises(PermissionDenied, match=r"officer hrss/alice may not call /kms.v1.IssuanceService/IssueCard"):
        policy.check(OFFICER, "/kms.v1.IssuanceService/IssueCard")
    with pytest.raises(PermissionDenied, match="no policy entry"):
        policy.check(AUDITOR, "/kms.v1.IssuanceService/DeleteEverything")
    for who in (STATION, OFFICER, AUDITOR):
        policy.check(who, "/kms.v1.IssuanceService/GetBatchStatus")


@pytest.mark.parametrize("text", [
    "version: 2\nmethods: {}\n",
    "version: 1\nmethods:\n  IssueCard: [station]\n",
    "version: 1\nmethods:\n  /kms.v1.X/Y: [root]\n",
    "version: 1\nmethods:\n  /kms.v1.X/Y: []\n",
    "version: 1\nmethods: {}\nextra: 1\n",
])
def test_malformed_policies_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        Policy.load(path)
