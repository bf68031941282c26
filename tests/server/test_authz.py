"""The authorization policy: default deny, every kms method covered, readable refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.errors import ConfigError, PermissionDenied
from kms.identity import Principal
from kms.server.authz import Policy

STATION = Principal("station", "station-a1", bureau="bureau-a")
OFFICER = Principal("officer", "alice", domain="hrss")
AUDITOR = Principal("auditor", "carol")


#: The worker services' internal API: served only on their Unix sockets (kms.server.worker), never by the mutual TLS
#: server, whose policy therefore names none of its methods (default deny).
INTERNAL = "worker.proto"


def _all_kms_methods(internal: bool = False) -> list[str]:
    """Every method of every service of every .proto file under protos/kms/v1 (through its generated module), but
    the internal API's (only those with ``internal``)."""
    import importlib

    protos = [p for p in sorted((Path(__file__).resolve().parents[2] / "protos" / "kms" / "v1").glob("*.proto"))
              if (p.name == INTERNAL) == internal]
    modules = [importlib.import_module(f"kms.v1.{proto.stem}_pb2") for proto in protos]
    return [f"/{service.full_name}/{method.name}"
            for module in modules for service in module.DESCRIPTOR.services_by_name.values()
            for method in service.methods]


def test_every_method_of_every_kms_service_has_a_policy_entry() -> None:
    methods = _all_kms_methods()
    assert "/kms.v1.IssuanceService/IssueCard" in methods
    assert "/kms.v1.CardService/ReportLost" in methods
    assert Policy.load().missing(methods) == []
    internal = _all_kms_methods(internal=True)
    assert "/kms.v1.DomainWorker/KeyOperation" in internal and Policy.load().missing(internal) == sorted(internal)


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


def test_card_lifecycle_is_changed_by_officers_and_read_by_officers_and_auditors() -> None:
    policy = Policy.load()
    for method in ("ReportLost", "CancelLossReport", "ReplaceCard", "CancelApplication"):
        policy.check(OFFICER, f"/kms.v1.CardService/{method}")
        for who in (STATION, AUDITOR):
            with pytest.raises(PermissionDenied, match="allowed: officer"):
                policy.check(who, f"/kms.v1.CardService/{method}")
    policy.check(OFFICER, "/kms.v1.CardService/GetCard")
    policy.check(AUDITOR, "/kms.v1.CardService/GetCard")
    with pytest.raises(PermissionDenied):
        policy.check(STATION, "/kms.v1.CardService/GetCard")
