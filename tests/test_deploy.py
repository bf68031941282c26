"""deploy/: the systemd unit examples are hardened as docs/operations.md says, run the separated layout of
docs/deployment.md (each component its own user, the workers' socket directories 2710 in the front end's group), and
`systemd-analyze verify` accepts them (with ExecStart pointed at this installation's kms, which verify requires to
exist; the template as an instance)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

UNITS = sorted((ROOT / "deploy").glob("*.service"))
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
             "StateDirectoryMode": "0700", "UMask": "0077", "CapabilityBoundingSet": "", "LimitCORE": "0",
             "KillMode": "mixed", "RestartPreventExitStatus": "2 3 6"}
#: unit -> (user, its own directory under /var/lib/kms, what it runs)
LAYOUT = {
    "kms-serve.service": ("kms-front", "kms/front", "/opt/kms/bin/kms serve"),
    "kms-worker@.service": ("kms-%i", "kms/%i", "/opt/kms/bin/kms worker --domain %i --config "
                                                "/var/lib/kms/%i/worker.yaml --listen unix:/run/kms/%i/worker.sock"),
    "kms-audit-signer.service": ("kms-audit", "kms/audit", "/opt/kms/bin/kms worker --audit --config "
                                 "/var/lib/kms/audit/worker.yaml --listen unix:/run/kms/audit/worker.sock"),
}
WORKERS = ["kms-worker@hrss.service", "kms-worker@bank.service", "kms-audit-signer.service"]


def _unit(unit: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text(encoding="utf-8"))
    return parser


def _service(unit: Path) -> dict[str, str]:
    return dict(_unit(unit)["Service"])


def _all(unit: Path, key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps the last one)."""
    return [line.split("=", 1)[1] for line in unit.read_text(encoding="utf-8").splitlines()
            if line.startswith(f"{key}=")]


def test_there_is_a_unit_for_the_front_end_each_domain_and_the_audit_signer() -> None:
    assert [u.name for u in UNITS] == sorted(LAYOUT)


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_are_hardened_and_run_as_a_user_of_their_own(unit: Path) -> None:
    service = _service(unit)
    user, state, command = LAYOUT[unit.name]
    assert service["User"] == service["Group"] == user
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{unit.name}: {key}"
    assert service["ExecStart"] == command
    # Writable: its own directory (StateDirectory, 0700, its user's) and at most the shared database directory.
    assert service["StateDirectory"] == state
    assert _all(unit, "ReadWritePaths") in ([], ["-/var/lib/kms/db"])
    assert ("ReadWritePaths" in service) == ("SupplementaryGroups" in service)  # the database: group kms-db
    if "SupplementaryGroups" in service:
        assert service["SupplementaryGroups"] == "kms-db" and unit.name != "kms-audit-signer.service"


@pytest.mark.parametrize("unit", [u for u in UNITS if u.name != "kms-serve.service"], ids=lambda u: u.name)
def test_a_worker_service_listens_in_a_socket_directory_only_the_front_ends_group_may_search(unit: Path) -> None:
    """docs/deployment.md: the socket's directory is the worker's user's, group kms-front, 2710 (setgid)."""
    service = _service(unit)
    instance = "%i" if "@" in unit.name else "audit"
    assert service["RuntimeDirectory"] == f"kms/{instance}" and service["RuntimeDirectoryMode"] == "2710"
    assert _all(unit, "ExecStartPre") == [f"+/usr/bin/chgrp kms-front /run/kms/{instance}",
                                          f"+/usr/bin/chmod 2710 /run/kms/{instance}"]
    assert service["ExecStart"].endswith(f" --listen unix:/run/kms/{instance}/worker.sock")
    assert _unit(unit)["Unit"]["Before"] == "kms-serve.service"


def test_the_front_end_starts_after_the_workers_and_holds_no_token() -> None:
    unit = _unit(ROOT / "deploy" / "kms-serve.service")
    for key in ("Wants", "After"):
        assert set(WORKERS) <= set(unit["Unit"][key].split()), key
    service = dict(unit["Service"])
    assert not any(key.startswith(("RuntimeDirectory", "ExecStartPre")) for key in service)
    assert "SOFTHSM2_CONF" not in unit["Service"].get("Environment", "")


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_accepts_the_units(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (Debian: apt-get install systemd)")
    kms = Path(sys.prefix) / "bin" / "kms"
    if not kms.exists():
        pytest.skip(f"no kms console script at {kms} for ExecStart (run `make setup`)")
    for each in UNITS:  # all of them beside each other: kms-serve.service wants the workers
        text = each.read_text(encoding="utf-8").replace("/opt/kms/bin/kms", str(kms))
        (tmp_path / each.name).write_text(text, encoding="utf-8")
    name = unit.name.replace("@.", "@hrss.")  # a template is verified as an instance
    if name != unit.name:
        (tmp_path / name).symlink_to(tmp_path / unit.name)
    result = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert result.returncode == 0 and result.stderr == "", result.stderr
