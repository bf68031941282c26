"""The shipped policies as package data, and the quorum policy a deployment names in kms.yaml."""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files

import yaml

from kms.ceremony.rules import DEFAULT_QUORUMS, QuorumPolicy
from kms.dev.home import Home
from kms.issuance.limits import DEFAULT_LIMITS
from kms.policies import shipped
from kms.server.authz import DEFAULT_POLICY
from kms.server.serve import Service


def test_the_defaults_are_the_package_data() -> None:
    data = files("kms.policies")
    assert data / "authz.yaml" == DEFAULT_POLICY and DEFAULT_POLICY.is_file()
    assert data / "quorum.yaml" == DEFAULT_QUORUMS and DEFAULT_QUORUMS.is_file()
    assert data / "limits.yaml" == DEFAULT_LIMITS and DEFAULT_LIMITS.is_file()
    assert sorted(p.name for p in shipped("profiles").iterdir()) == ["dual-app-mixed.yaml", "dual-app-sm.yaml",
                                                                     "dual-app.yaml"]


def test_the_service_uses_the_quorum_policy_its_configuration_names(home: Home) -> None:
    default = QuorumPolicy.load()
    assert default.quorum("hrss", "authorize-batch").required == 1
    custom = home.path / "quorum-custom.yaml"
    custom.write_text(DEFAULT_QUORUMS.read_text().replace("authorize-batch: {approvals: 1, role: approver}",
                                                          "authorize-batch: {approvals: 2, role: approver}", 1))
    doc = yaml.safe_load(home.config.read_text())
    doc["server"]["quorum_policy"] = custom.name  # relative: beside kms.yaml
    config = home.path / "kms-custom-quorum.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    svc = Service(config, listen="127.0.0.1:0")
    try:
        assert svc.ceremonies.policy.quorum("hrss", "authorize-batch").required == 2  # the named file
        assert svc.ceremonies.policy.quorum("bank", "authorize-batch").required == 1
        started = [json.loads(r.body) for r in svc.audit.records(0, kind="service.started")][-1]
        assert started["detail"]["policies"]["quorum"] == hashlib.sha256(custom.read_bytes()).hexdigest()
    finally:
        svc.stop(grace=0)
