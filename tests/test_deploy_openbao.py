"""deploy/openbao/: the shipped OpenBao policies, loaded into a real OpenBao server (tests/openbao.py), each bound
to an AppRole as deploy/openbao/README.md says; every role reads its own secrets and is denied everyone else's."""

from __future__ import annotations

import re
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
from helpers import ROOT
from openbao import BaoServer

POLICIES = ROOT / "deploy" / "openbao"
STATIONS = ("station-a1", "station-b1")

#: Every secret path kms uses (KV v2 on mount kv/), as docs/deployment.md lays them out.
SECRETS = ["kms/hrss", "kms/hrss/database", "kms/bank", "kms/bank/database", "kms/audit", "kms/audit/database",
           "kms/front/database", "kms/front/tls", *(f"kms/station/{s}" for s in STATIONS),
           *(f"kms/station/{s}/tls" for s in STATIONS), "kms/other"]

#: Role (policy name) -> the paths it may read; every other path of SECRETS is denied.
READS = {
    "kms-hrss": {"kms/hrss", "kms/hrss/database"},
    "kms-bank": {"kms/bank", "kms/bank/database"},
    "kms-audit": {"kms/audit", "kms/audit/database"},
    "kms-front": {"kms/front/database", "kms/front/tls"},
    **{f"kms-station-{s}": {f"kms/station/{s}", f"kms/station/{s}/tls"} for s in STATIONS},
}
#: The policy files of this section (another helper ships kms-audit-anchor.hcl: it is loaded, not checked here).
MINE = {"kms-hrss.hcl", "kms-bank.hcl", "kms-audit.hcl", "kms-front.hcl", "kms-station-NAME.hcl"}


def _policies() -> dict[str, str]:
    """Policy name -> HCL, as an operator writes them (the station template once per station)."""
    out = {}
    for path in sorted(POLICIES.glob("*.hcl")):
        text = path.read_text(encoding="utf-8")
        if "NAME" in path.stem:
            out.update({path.stem.replace("NAME", s): text.replace("NAME", s) for s in STATIONS})
        else:
            out[path.stem] = text
    return out


def test_the_policies_grant_reads_only() -> None:
    assert {p.name for p in POLICIES.glob("*.hcl")} >= MINE
    for name in MINE:
        text = (POLICIES / name).read_text(encoding="utf-8")
        capabilities = re.findall(r"capabilities\s*=\s*\[([^\]]*)\]", text)
        assert capabilities and all(c.replace(" ", "") == '"read"' for c in capabilities), name
        assert all(p.startswith("kv/data/kms/") for p in re.findall(r'path\s+"([^"]+)"', text)), name


def _reader(server: BaoServer, policy: str) -> hvac.Client:
    role_id, secret_id = server.approle(policy, _policies()[policy])
    client = hvac.Client(url=server.address, timeout=10)
    client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    return client


@pytest.fixture(scope="module")
def loaded(openbao: BaoServer) -> BaoServer:
    root = openbao.client()
    for name, hcl in _policies().items():
        root.sys.create_or_update_policy(name=name, policy=hcl)  # every shipped policy is valid HCL to OpenBao
    for path in SECRETS:
        openbao.put(path, value=f"secret of {path}")
    return openbao


@pytest.mark.parametrize("policy", sorted(READS))
def test_each_role_reads_its_own_secrets_and_no_other(loaded: BaoServer, policy: str) -> None:
    client = _reader(loaded, policy)
    allowed = set()
    for path in SECRETS:
        try:
            read = client.secrets.kv.v2.read_secret_version(path=path, mount_point="kv", raise_on_deleted_version=True)
        except hvac.exceptions.Forbidden:
            continue
        assert read["data"]["data"]["value"] == f"secret of {path}"
        allowed.add(path)
    assert allowed == READS[policy]
    with pytest.raises(hvac.exceptions.Forbidden):  # and it writes nothing, not even its own
        client.secrets.kv.v2.create_or_update_secret(path=sorted(READS[policy])[0], secret={"value": "x"},
                                                     mount_point="kv")
    with pytest.raises(hvac.exceptions.Forbidden):  # nor lists what there is
        client.secrets.kv.v2.list_secrets(path="kms", mount_point="kv")


def test_the_readme_writes_every_policy_it_ships() -> None:
    readme = (POLICIES / "README.md").read_text(encoding="utf-8")
    for name in MINE:
        assert name in readme, name
    assert Path(POLICIES / "README.md").is_file()
